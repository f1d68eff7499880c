//! `kubectl chatrelease`: the kubectl plugin a person steers a ChatRelease with. `simulate` runs the
//! rollout on a scenario file with no cluster; `status` shows where a release stands; `promote`,
//! `rollback`, `pause`, `resume` and `retry` set or remove the annotations the operator acts on.
//!
//! What is printed is built by pure functions (`render_status`, `steer_patch`, `steer_message`) so
//! that tests read it without a cluster; the async functions only fetch, patch and watch.

use crate::annotations::{Command, PAUSE};
use crate::crd::{AnalysisRecord, ChatRelease, ChatReleaseStatus, PauseReason, Phase};
use crate::judge::fmt_number;
use crate::simulate::{self, ScenarioError};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, ResourceExt};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

/// Field manager recorded on the annotation patches, so `managedFields` shows who set them.
const FIELD_MANAGER: &str = "kubectl-chatrelease";

/// Width of the weight bar in `status`: one character per 5%.
const BAR_WIDTH: usize = 20;

/// The command line of `kubectl chatrelease`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kubectl-chatrelease",
    bin_name = "kubectl chatrelease",
    version,
    about = "Steer and inspect ChatRelease canary releases"
)]
pub struct Cli {
    /// Namespace of the ChatRelease. Default: the current kubeconfig context's namespace.
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,

    #[command(subcommand)]
    pub command: CliCommand,
}

/// One subcommand of `kubectl chatrelease`.
#[derive(Debug, clap::Subcommand)]
pub enum CliCommand {
    /// Show phase, step, images, the last analysis and the conditions of a ChatRelease.
    Status {
        /// Name of the ChatRelease.
        name: String,
        /// Redraw whenever the ChatRelease changes, until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
        /// With --watch: print one line per change instead of redrawing (time, phase, weight,
        /// a new analysis with canary vs stable per check, message), for logs and narration.
        #[arg(long, requires = "watch")]
        timeline: bool,
    },
    /// List the ChatReleases in the namespace (or in all namespaces with -A).
    List {
        /// List ChatReleases in every namespace.
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
    },
    /// Pass the manual gate the canary waits at (sets chatrelease.io/promote).
    Promote {
        /// Name of the ChatRelease.
        name: String,
    },
    /// Move all traffic back to stable now (sets chatrelease.io/rollback).
    Rollback {
        /// Name of the ChatRelease.
        name: String,
    },
    /// Hold the rollout where it is (sets chatrelease.io/pause).
    Pause {
        /// Name of the ChatRelease.
        name: String,
    },
    /// Let a paused rollout continue (removes chatrelease.io/pause).
    Resume {
        /// Name of the ChatRelease.
        name: String,
    },
    /// Try a rolled-back revision again (sets chatrelease.io/retry).
    Retry {
        /// Name of the ChatRelease.
        name: String,
    },
    /// Run the rollout on observations from a scenario file, with no cluster; one JSON line per tick.
    Simulate {
        /// The scenario, in the format of the README and tests/scenarios.
        scenario: PathBuf,
    },
}

impl CliCommand {
    /// Whether the command needs a kubeconfig and the API server; `simulate` does not.
    pub fn talks_to_cluster(&self) -> bool {
        !matches!(self, CliCommand::Simulate { .. })
    }
}

/// What went wrong, with the object or file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The scenario file could not be read.
    #[error("{path}: {source}")]
    ReadScenario {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The scenario file is not a valid scenario; the message names the field.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// Neither a kubeconfig nor an in-cluster configuration could be loaded.
    #[error(
        "cannot load a kubeconfig: {0} (set KUBECONFIG or pick a context with kubectl config use-context)"
    )]
    Config(#[source] kube::config::InferConfigError),
    /// The Kubernetes client could not be built from the configuration.
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// The ChatRelease does not exist.
    #[error("ChatRelease {namespace}/{name} not found (kubectl get chr -n {namespace} lists them)")]
    NotFound { namespace: String, name: String },
    /// The API server refused or failed a request.
    #[error("{verb} ChatRelease {namespace}/{name}: {source}")]
    Api {
        verb: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// ChatReleases could not be listed.
    #[error("list ChatReleases in {scope}: {source}")]
    List {
        scope: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// A tick of `simulate` could not be written as JSON.
    #[error("cannot write tick {tick} as JSON: {source}")]
    Serialize {
        tick: usize,
        #[source]
        source: serde_json::Error,
    },
    /// Ctrl-C could not be listened for, so `--watch` could not end cleanly.
    #[error("cannot listen for Ctrl-C: {0}")]
    Signal(#[source] std::io::Error),
    /// Standard output could not be written.
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
}

impl CliError {
    fn api(verb: &'static str, namespace: &str, name: &str, source: kube::Error) -> Self {
        if let kube::Error::Api(status) = &source
            && status.is_not_found()
        {
            return CliError::NotFound {
                namespace: namespace.into(),
                name: name.into(),
            };
        }
        CliError::Api {
            verb,
            namespace: namespace.into(),
            name: name.into(),
            source: Box::new(source),
        }
    }

    /// Exit status: 2 for a bad scenario file (as the design promises), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::ReadScenario { .. } | CliError::Scenario(_) => 2,
            _ => 1,
        }
    }

    /// The reader of our output went away (`| head`): nothing left to say, and not a failure.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// Makes aws-lc-rs (what kube is built with) the process's rustls crypto provider. kube builds its
/// TLS config from the process default; rustls picks one by itself only while exactly one provider
/// is compiled in, so a dependency that enables ring would otherwise make the first client panic.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is all we need.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Runs one command, writing what it has to say to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> Result<(), CliError> {
    if let CliCommand::Simulate { scenario } = &cli.command {
        // Before any kubeconfig is touched: simulate must work on a laptop with no cluster.
        for line in simulate_file(scenario)? {
            writeln!(out, "{line}").map_err(CliError::Output)?;
        }
        return Ok(());
    }
    let (client, namespace) = connect(cli.namespace).await?;
    let api: Api<ChatRelease> = Api::namespaced(client.clone(), &namespace);
    let said = match cli.command {
        CliCommand::Simulate { .. } => return Ok(()),
        CliCommand::List { all_namespaces } => list(&client, &namespace, all_namespaces).await?,
        CliCommand::Status {
            name, watch: false, ..
        } => {
            let release = get(&api, &namespace, &name).await?;
            match recent_events(&client, &namespace, &name).await {
                Ok(events) => render_status_with_events(&release, &events),
                Err(e) => format!("{}\nevents: unavailable ({e})\n", render_status(&release)),
            }
        }
        CliCommand::Status {
            name,
            watch: true,
            timeline,
        } => {
            return watch_status(&client, &namespace, &name, timeline, out).await;
        }
        CliCommand::Promote { name } => {
            steer(&api, &namespace, &name, Steer::Set(Command::Promote)).await?
        }
        CliCommand::Rollback { name } => {
            steer(&api, &namespace, &name, Steer::Set(Command::Rollback)).await?
        }
        CliCommand::Pause { name } => {
            steer(&api, &namespace, &name, Steer::Set(Command::Pause)).await?
        }
        CliCommand::Retry { name } => {
            steer(&api, &namespace, &name, Steer::Set(Command::Retry)).await?
        }
        CliCommand::Resume { name } => steer(&api, &namespace, &name, Steer::Resume).await?,
    };
    write!(out, "{said}").map_err(CliError::Output)?;
    out.flush().map_err(CliError::Output)
}

/// Reads, checks and runs a scenario file: one JSON object per tick, as `simulate` prints them.
pub fn simulate_file(path: &Path) -> Result<Vec<String>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadScenario {
        path: path.display().to_string(),
        source,
    })?;
    let scenario = simulate::parse(&text)?;
    simulate::run(&scenario)?
        .iter()
        .map(|outcome| {
            serde_json::to_string(outcome).map_err(|source| CliError::Serialize {
                tick: outcome.tick,
                source,
            })
        })
        .collect()
}

/// A client for the current kubeconfig context, and the namespace to work in.
async fn connect(namespace: Option<String>) -> Result<(Client, String), CliError> {
    let config = kube::Config::infer().await.map_err(CliError::Config)?;
    let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(CliError::Client)?;
    Ok((client, namespace))
}

async fn get(api: &Api<ChatRelease>, namespace: &str, name: &str) -> Result<ChatRelease, CliError> {
    api.get(name)
        .await
        .map_err(|e| CliError::api("get", namespace, name, e))
}

/// `list`: the ChatReleases in `namespace`, or in every namespace.
async fn list(client: &Client, namespace: &str, all_namespaces: bool) -> Result<String, CliError> {
    let (api, scope): (Api<ChatRelease>, String) = if all_namespaces {
        (Api::all(client.clone()), "all namespaces".into())
    } else {
        (
            Api::namespaced(client.clone(), namespace),
            format!("namespace {namespace}"),
        )
    };
    let releases = api
        .list(&ListParams::default())
        .await
        .map_err(|source| CliError::List {
            scope: scope.clone(),
            source: Box::new(source),
        })?;
    if releases.items.is_empty() {
        return Ok(if all_namespaces {
            "No ChatReleases in any namespace.\n".to_string()
        } else {
            format!("No ChatReleases in namespace {namespace}.\n")
        });
    }
    Ok(render_list(&releases.items, all_namespaces))
}

/// Most characters of a message shown in one table cell.
const MESSAGE_WIDTH: usize = 60;

/// How many Events `status` shows.
const MAX_EVENTS: usize = 8;

/// Cuts `text` to at most `max` characters (on one line), marking the cut with `...`.
fn truncate(text: &str, max: usize) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() <= max {
        return text;
    }
    let kept: String = text.chars().take(max.saturating_sub(3)).collect();
    format!("{}...", kept.trim_end())
}

/// The `list` table: NAME, (NAMESPACE with `all_namespaces`,) PHASE, WEIGHT, STEP, STABLE, CANARY,
/// MESSAGE. Pure, so tests pin it down.
pub fn render_list(releases: &[ChatRelease], all_namespaces: bool) -> String {
    let mut headers = vec!["NAME"];
    if all_namespaces {
        headers.push("NAMESPACE");
    }
    headers.extend(["PHASE", "WEIGHT", "STEP", "STABLE", "CANARY", "MESSAGE"]);
    let dash = |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or("-").to_string();
    let rows = releases
        .iter()
        .map(|release| {
            let mut row = vec![release.name_any()];
            if all_namespaces {
                row.push(release.namespace().unwrap_or_default());
            }
            match &release.status {
                None => row.extend(
                    ["-", "-", "-", "-", "-", "no status yet"]
                        .iter()
                        .map(|s| s.to_string()),
                ),
                Some(status) => {
                    let step = status.current_step.map_or("-".to_string(), |i| {
                        format!("{}/{}", i + 1, release.spec.strategy.steps.len())
                    });
                    row.extend([
                        status.phase.to_string(),
                        format!("{}%", status.canary_weight),
                        step,
                        dash(status.stable_image.as_deref()),
                        dash(status.canary_image.as_deref()),
                        dash(Some(&truncate(&status.message, MESSAGE_WIDTH))),
                    ]);
                }
            }
            row
        })
        .collect();
    let mut text = table(&headers, rows)
        .iter()
        .map(|line| line.strip_prefix("  ").unwrap_or(line).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    text
}

/// The Events about ChatRelease `namespace/name`, oldest first.
async fn recent_events(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Vec<Event>, kube::Error> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selected = ListParams::default().fields(&events_about(name));
    let items = match api.list(&selected).await {
        Ok(list) => list.items,
        // An API server that does not know the field selector: filter here instead.
        Err(kube::Error::Api(status)) if status.code == 400 => {
            api.list(&ListParams::default()).await?.items
        }
        Err(e) => return Err(e),
    };
    let mut events: Vec<Event> = items.into_iter().filter(|e| is_about(e, name)).collect();
    events.sort_by_key(event_time);
    Ok(events)
}

/// The field selector for Events about ChatRelease `name`. The API server may not honour it, so
/// [`is_about`] checks each Event again.
fn events_about(name: &str) -> String {
    format!("regarding.name={name},regarding.kind=ChatRelease")
}

/// Whether `event` is about ChatRelease `name` (in the namespace it was read from).
fn is_about(event: &Event, name: &str) -> bool {
    event.regarding.as_ref().is_some_and(|r| {
        r.name.as_deref() == Some(name) && r.kind.as_deref() == Some("ChatRelease")
    })
}

/// When an Event last happened: its series' last sighting, else its time, else when it was stored.
fn event_time(event: &Event) -> Option<jiff::Timestamp> {
    event
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0)
        .or(event.event_time.as_ref().map(|t| t.0))
        .or(event.deprecated_last_timestamp.as_ref().map(|t| t.0))
        .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The "Recent events" section of `status`: the last [`MAX_EVENTS`] of `events` (oldest first),
/// newest last, with time, type, reason and note. Pure, so tests pin it down.
pub fn render_events(events: &[Event]) -> String {
    if events.is_empty() {
        return "Recent events: none\n".to_string();
    }
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| event_time(e));
    let shown = &sorted[sorted.len().saturating_sub(MAX_EVENTS)..];
    let dash = |v: Option<&String>| {
        v.filter(|v| !v.is_empty())
            .map_or("-".to_string(), |v| v.clone())
    };
    let rows = shown
        .iter()
        .map(|e| {
            vec![
                // Whole seconds, like the conditions': the fraction only widens the column.
                event_time(e).map_or("-".to_string(), |t| {
                    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
                }),
                dash(e.type_.as_ref()),
                dash(e.reason.as_ref()),
                dash(Some(&truncate(
                    e.note.as_deref().unwrap_or(""),
                    MESSAGE_WIDTH,
                ))),
            ]
        })
        .collect();
    let mut lines = vec!["Recent events".to_string()];
    lines.extend(table(&["TIME", "TYPE", "REASON", "NOTE"], rows));
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// A change a person asks of the operator through an annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// Set the command's annotation to `"true"`.
    Set(Command),
    /// Remove `chatrelease.io/pause`.
    Resume,
}

/// The JSON merge patch that makes the change: `null` deletes a key in a merge patch.
pub fn steer_patch(steer: Steer) -> serde_json::Value {
    let (key, value) = match steer {
        Steer::Set(command) => (command.annotation(), serde_json::Value::from("true")),
        Steer::Resume => (PAUSE, serde_json::Value::Null),
    };
    serde_json::json!({ "metadata": { "annotations": { key: value } } })
}

/// What a person is told after the change, naming the object and what the operator will do.
pub fn steer_message(steer: Steer, namespace: &str, name: &str) -> String {
    let object = format!("{namespace}/{name}");
    match steer {
        Steer::Set(command) => {
            let effect = match command {
                Command::Rollback => {
                    "the operator moves all traffic to stable on its next reconcile".to_string()
                }
                Command::Promote => {
                    "the operator passes the current manual gate on its next reconcile".to_string()
                }
                Command::Pause => format!(
                    "the operator holds the rollout where it is until `kubectl chatrelease resume {name}`"
                ),
                Command::Retry => {
                    "the operator tries the rolled-back revision again on its next reconcile"
                        .to_string()
                }
            };
            format!("{} set on {object}; {effect}\n", command.annotation())
        }
        Steer::Resume => format!(
            "{PAUSE} removed from {object}; the operator continues the rollout on its next reconcile\n"
        ),
    }
}

/// Applies a change with a JSON merge patch and says what was done.
async fn steer(
    api: &Api<ChatRelease>,
    namespace: &str,
    name: &str,
    steer: Steer,
) -> Result<String, CliError> {
    if steer == Steer::Resume {
        // Read first: removing an annotation that is not there would print a misleading success.
        let release = get(api, namespace, name).await?;
        if !release.annotations().contains_key(PAUSE) {
            let mut said = format!("{PAUSE} is not set on {namespace}/{name}; nothing to resume\n");
            said.push_str(&gate_hint(&release));
            return Ok(said);
        }
    }
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patched = api
        .patch(name, &params, &Patch::Merge(steer_patch(steer)))
        .await
        .map_err(|e| CliError::api("patch", namespace, name, e))?;
    let mut said = steer_message(steer, namespace, name);
    if steer == Steer::Resume {
        said.push_str(&gate_hint(&patched));
    }
    Ok(said)
}

/// A manual gate is not lifted by `resume`; say so rather than leave a person waiting.
fn gate_hint(release: &ChatRelease) -> String {
    let at_gate = release
        .status
        .as_ref()
        .is_some_and(|s| s.pause_reason == Some(PauseReason::ManualGate));
    if at_gate {
        format!(
            "note: it also waits at a manual gate; `kubectl chatrelease promote {}` passes it\n",
            release.name_any()
        )
    } else {
        String::new()
    }
}

/// `status --watch`: redraws whenever the rendered view (the release or its Events) changes, or,
/// with `timeline`, appends one line per change, until Ctrl-C or deletion.
async fn watch_status(
    client: &Client,
    namespace: &str,
    name: &str,
    timeline: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let api: Api<ChatRelease> = Api::namespaced(client.clone(), namespace);
    // A typo in the name should fail at once, not wait silently for an object that never comes.
    get(&api, namespace, name).await?;
    // Backoff keeps a flapping API server from turning the retry into a busy loop.
    let updates = watcher::watch_object(api, name).default_backoff();
    let mut updates = std::pin::pin!(updates);
    // The Events are kept by a reflector, so a redraw has all of them, not only the last one.
    let (events, events_writer) = reflector::store::<Event>();
    let mut event_changes: BoxStream<'static, Result<(), watcher::Error>> = if timeline {
        futures::stream::pending().boxed()
    } else {
        let events_api: Api<Event> = Api::namespaced(client.clone(), namespace);
        let selected = watcher::Config::default().fields(&events_about(name));
        reflector::reflector(events_writer, watcher(events_api, selected))
            .default_backoff()
            .map(|change| change.map(|_| ()))
            .boxed()
    };
    let ctrl_c = tokio::signal::ctrl_c();
    let mut ctrl_c = std::pin::pin!(ctrl_c);
    let clear = std::io::stdout().is_terminal();
    let mut shown = String::new();
    let mut last_seen: Option<ChatReleaseStatus> = None;
    let mut latest: Option<ChatRelease> = None;
    loop {
        tokio::select! {
            signal = &mut ctrl_c => return signal.map_err(CliError::Signal),
            update = updates.next() => match update {
                None => return Ok(()),
                Some(Err(e)) => {
                    eprintln!("warning: watching ChatRelease {namespace}/{name}: {e}; retrying");
                    continue;
                }
                Some(Ok(None)) => {
                    writeln!(out, "ChatRelease {namespace}/{name} was deleted")
                        .map_err(CliError::Output)?;
                    return Ok(());
                }
                Some(Ok(Some(release))) if timeline => {
                    let now = jiff::Zoned::now();
                    if let Some(line) = timeline_line(last_seen.as_ref(), &release, &now) {
                        writeln!(out, "{line}").map_err(CliError::Output)?;
                        out.flush().map_err(CliError::Output)?;
                    }
                    last_seen = Some(release.status.unwrap_or_default());
                    continue;
                }
                Some(Ok(Some(release))) => latest = Some(release),
            },
            change = event_changes.next() => match change {
                Some(Err(e)) => {
                    eprintln!("warning: watching the Events of {namespace}/{name}: {e}; retrying");
                    continue;
                }
                // The reflector's stream does not end; were it to, the view keeps its last Events.
                None => event_changes = futures::stream::pending().boxed(),
                Some(Ok(())) => {}
            },
        }
        let Some(release) = &latest else { continue };
        let about: Vec<Event> = events
            .state()
            .iter()
            .filter(|e| is_about(e, name))
            .map(|e| Event::clone(e))
            .collect();
        let view = render_status_with_events(release, &about);
        // Writes that change nothing we show (resourceVersion only) are not redrawn.
        if view == shown {
            continue;
        }
        if clear {
            write!(out, "\x1b[2J\x1b[H").map_err(CliError::Output)?;
        } else if !shown.is_empty() {
            writeln!(out, "---").map_err(CliError::Output)?;
        }
        write!(out, "{view}").map_err(CliError::Output)?;
        out.flush().map_err(CliError::Output)?;
        shown = view;
    }
}

/// What `status` prints: [`render_status`], then the Recent events section.
pub fn render_status_with_events(release: &ChatRelease, events: &[Event]) -> String {
    format!("{}\n{}", render_status(release), render_events(events))
}

/// The `status` view of a ChatRelease: what a person needs to decide whether to promote, wait or
/// roll back. Pure, so tests pin it down.
pub fn render_status(release: &ChatRelease) -> String {
    let name = release.name_any();
    let namespace = release.namespace().unwrap_or_default();
    let fallback = ChatReleaseStatus::default();
    let status = release.status.as_ref().unwrap_or(&fallback);
    let steps = &release.spec.strategy.steps;

    let mut lines = vec![format!("ChatRelease {namespace}/{name}")];
    let mut phase = status.phase.to_string();
    if release.status.is_none() {
        phase.push_str(" (no status yet: is the operator running?)");
    } else if status.phase == Phase::Paused {
        phase.push_str(&match status.pause_reason {
            Some(PauseReason::ManualGate) => {
                format!(" at a manual gate: kubectl chatrelease promote {name}")
            }
            Some(PauseReason::Annotation) => {
                format!(" by {PAUSE}: kubectl chatrelease resume {name}")
            }
            Some(PauseReason::Inconclusive) => {
                " after inconclusive analyses: promote or roll back by hand".to_string()
            }
            None => String::new(),
        });
    }
    let step = status
        .current_step
        .map_or("-".to_string(), |i| (i + 1).to_string());
    let weight = status.canary_weight;
    let track = |image: &Option<String>, revision: &Option<String>| {
        let image = image.as_deref().unwrap_or("-");
        match revision {
            Some(revision) => format!("{image}  (revision {revision})"),
            None => image.to_string(),
        }
    };
    let limit = release.spec.analysis.failure_limit;
    let fields = [
        ("Phase", phase),
        (
            "Step",
            format!(
                "{step}/{} at {weight}%  {}  (steps {})",
                steps.len(),
                weight_bar(weight),
                steps_text(steps, &release.spec.strategy.manual_gates)
            ),
        ),
        (
            "Stable",
            track(&status.stable_image, &status.stable_revision),
        ),
        (
            "Canary",
            track(&status.canary_image, &status.canary_revision),
        ),
        (
            "Failures",
            format!("{} in a row (rolls back at {limit})", status.failed_checks),
        ),
        (
            "Message",
            if status.message.is_empty() {
                "-".to_string()
            } else {
                status.message.clone()
            },
        ),
    ];
    lines.extend(
        fields
            .iter()
            .map(|(label, value)| format!("  {label:<9} {value}").trim_end().to_string()),
    );

    lines.push(String::new());
    match &status.last_analysis {
        Some(analysis) => lines.extend(analysis_lines(analysis)),
        None => lines.push("Last analysis: none yet".into()),
    }

    lines.push(String::new());
    if status.conditions.is_empty() {
        lines.push("Conditions: none yet".into());
    } else {
        lines.push("Conditions".into());
        let rows = status
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.last_transition_time.0.to_string(),
                    // In full on the Message line above; here only enough to tell them apart.
                    truncate(&c.message, MESSAGE_WIDTH),
                ]
            })
            .collect();
        lines.extend(table(
            &["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            rows,
        ));
    }

    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn analysis_lines(analysis: &AnalysisRecord) -> Vec<String> {
    let requests = |r: Option<f64>| r.map_or("-".to_string(), fmt_number);
    let mut lines = vec![format!(
        "Last analysis: {} at {}% ({}), {} canary / {} stable requests",
        analysis.verdict,
        analysis.weight,
        analysis.time.0,
        requests(analysis.canary_requests),
        requests(analysis.stable_requests),
    )];
    if !analysis.checks.is_empty() {
        let value =
            |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| fmt_number(v) + unit);
        let rows = analysis
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    value(c.canary, &c.unit),
                    value(c.stable, &c.unit),
                    c.bound.clone(),
                    c.verdict.to_string(),
                ]
            })
            .collect();
        lines.extend(table(
            &["CHECK", "CANARY", "STABLE", "BOUND", "VERDICT"],
            rows,
        ));
    }
    if !analysis.reason.is_empty() {
        lines.push(format!("  {}", analysis.reason));
    }
    lines
}

/// One line of `status --watch --timeline` for `release` as seen at `at`, or `None` when nothing it
/// shows changed since `previous` (the status of the last object seen; `None` before the first):
/// time, phase, weight, then for an analysis not shown before its verdict with each check's canary
/// vs stable value and bound, then the message. Append-only, so it reads well in a log.
pub fn timeline_line(
    previous: Option<&ChatReleaseStatus>,
    release: &ChatRelease,
    at: &jiff::Zoned,
) -> Option<String> {
    let fallback = ChatReleaseStatus::default();
    let status = release.status.as_ref().unwrap_or(&fallback);
    let analysis_time = |s: &ChatReleaseStatus| s.last_analysis.as_ref().map(|a| a.time.clone());
    let new_analysis = status
        .last_analysis
        .as_ref()
        .filter(|_| previous.is_none_or(|p| analysis_time(p) != analysis_time(status)));
    if let Some(p) = previous
        && new_analysis.is_none()
        && (p.phase, p.canary_weight, p.pause_reason, &p.message)
            == (
                status.phase,
                status.canary_weight,
                status.pause_reason,
                &status.message,
            )
    {
        return None;
    }
    let mut line = format!(
        "{}  {:<12}{:>3}%  ",
        at.strftime("%H:%M:%S"),
        status.phase.to_string(),
        status.canary_weight
    );
    if let Some(a) = new_analysis {
        let requests = |r: Option<f64>| r.map_or("-".to_string(), fmt_number);
        let value =
            |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| fmt_number(v) + unit);
        let checks: Vec<String> = a
            .checks
            .iter()
            .map(|c| {
                format!(
                    "{} canary {} vs stable {} ({}) {}",
                    c.name,
                    value(c.canary, &c.unit),
                    value(c.stable, &c.unit),
                    c.bound,
                    c.verdict
                )
            })
            .collect();
        line.push_str(&format!(
            "[analysis {} at {}%, {} canary / {} stable requests",
            a.verdict,
            a.weight,
            requests(a.canary_requests),
            requests(a.stable_requests)
        ));
        if !checks.is_empty() {
            line.push_str(": ");
            line.push_str(&checks.join("; "));
        }
        line.push_str("] ");
    }
    if release.status.is_none() {
        line.push_str("no status yet: is the operator running?");
    } else if status.message.is_empty() {
        line.push('-');
    } else {
        line.push_str(&status.message);
    }
    Some(line.trim_end().to_string())
}

/// `[#####...............]`: the canary's share of traffic at a glance.
fn weight_bar(weight: i32) -> String {
    let percent = usize::try_from(weight.clamp(0, 100)).unwrap_or(0);
    // Rounded to the nearest character, so 5% still shows one mark.
    let filled = (percent * BAR_WIDTH + 50) / 100;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR_WIDTH - filled))
}

/// `5, 25, 50, gate 100`: the steps, marking the ones that wait for a person.
fn steps_text(steps: &[i32], gates: &[i32]) -> String {
    steps
        .iter()
        .map(|s| {
            if gates.contains(s) {
                format!("gate {s}")
            } else {
                s.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Left-aligned columns, two spaces apart, indented by two; no trailing spaces.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header = headers.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    std::iter::once(header)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            format!("  {}", cells.join("  ")).trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A canary at its second step, after a passing analysis, as the operator would leave it.
    fn progressing() -> ChatRelease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "chatrelease.io/v1alpha1",
            "kind": "ChatRelease",
            "metadata": {"name": "lobe-chat", "namespace": "chat"},
            "spec": {
                "template": {"spec": {"containers": [
                    {"name": "lobe-chat", "image": "lobehub/lobe-chat:v1.9.0"}
                ]}},
                "strategy": {"steps": [5, 25, 50, 100], "manualGates": [100]},
                "analysis": {"latencyP99": {"max": "3s"}}
            },
            "status": {
                "phase": "Progressing",
                "canaryWeight": 25,
                "currentStep": 1,
                "stableRevision": "5d8f9c2a01",
                "canaryRevision": "7b1e0f3c44",
                "stableImage": "lobehub/lobe-chat:v1.8.0",
                "canaryImage": "lobehub/lobe-chat:v1.9.0",
                "failedChecks": 0,
                "message": "analysis passed at 5%: advanced to 25%",
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Progressing",
                     "message": "analysis passed at 5%: advanced to 25%",
                     "lastTransitionTime": "2025-11-21T10:00:00Z"},
                    {"type": "Progressing", "status": "True", "reason": "Advanced",
                     "message": "analysis passed at 5%: advanced to 25%",
                     "lastTransitionTime": "2025-11-21T10:01:00Z"}
                ],
                "lastAnalysis": {
                    "time": "2025-11-21T10:01:00Z",
                    "verdict": "Pass",
                    "weight": 5,
                    "canaryRequests": 2000.0,
                    "stableRequests": 38000.0,
                    "checks": [
                        {"name": "error-rate", "canary": 0.2, "stable": 0.2, "bound": "<= 1%",
                         "unit": "%", "verdict": "Pass", "note": "error rate 0.20%"},
                        {"name": "latency-p99", "canary": 800.0, "stable": 780.0,
                         "bound": "<= 3000ms", "unit": "ms", "verdict": "Pass", "note": "p99 800ms"}
                    ],
                    "reason": "all checks within bounds"
                }
            }
        }))
        .expect("fixture is a valid ChatRelease")
    }

    #[test]
    fn list_shows_one_aligned_row_per_release_and_namespace_only_with_all() {
        let mut long = progressing();
        long.metadata.name = Some("api".into());
        long.metadata.namespace = Some("backend".into());
        if let Some(status) = long.status.as_mut() {
            status.message = "x".repeat(100);
        }
        let mut fresh = progressing();
        fresh.metadata.name = Some("new".into());
        fresh.status = None;
        let releases = [progressing(), long, fresh];

        let text = render_list(&releases, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(!lines[0].contains("NAMESPACE"), "{text}");
        for header in ["PHASE", "WEIGHT", "STEP", "STABLE", "CANARY", "MESSAGE"] {
            assert!(lines[0].contains(header), "{header} missing: {text}");
        }
        assert!(lines[1].starts_with("lobe-chat"), "{text}");
        for cell in [
            "Progressing",
            "25%",
            "2/4",
            "lobehub/lobe-chat:v1.8.0",
            "lobehub/lobe-chat:v1.9.0",
            "analysis passed at 5%: advanced to 25%",
        ] {
            assert!(lines[1].contains(cell), "{cell} missing: {text}");
        }
        let column = |line: &str| line.find("Progressing").or(line.find('-'));
        assert_eq!(column(lines[1]), lines[0].find("PHASE"), "{text}");
        assert!(
            lines[2].ends_with(&format!("{}...", "x".repeat(57))),
            "{text}"
        );
        assert!(!lines[2].contains(&"x".repeat(61)), "{text}");
        assert!(lines[3].contains("no status yet"), "{text}");

        let all = render_list(&releases, true);
        let header = all.lines().next().unwrap_or_default();
        assert!(header.starts_with("NAME"), "{all}");
        assert!(header.find("NAMESPACE") < header.find("PHASE"), "{all}");
        assert!(all.contains("backend"), "{all}");
        assert!(
            all.lines().nth(1).is_some_and(|l| l.contains("chat")),
            "{all}"
        );
    }

    fn event(second: u32, reason: &str, note: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("lobe-chat.{second}"), "namespace": "chat"},
            "eventTime": format!("2025-11-21T10:00:{second:02}.184552Z"),
            "reportingController": "chatrelease.io/operator",
            "reportingInstance": "operator-0",
            "action": "Reconcile",
            "type": if reason == "RolledBack" { "Warning" } else { "Normal" },
            "reason": reason,
            "note": note,
            "regarding": {"kind": "ChatRelease", "name": "lobe-chat", "namespace": "chat"}
        }))
        .expect("fixture is a valid Event")
    }

    #[test]
    fn the_watch_view_shows_the_status_then_the_events_of_this_release_only() {
        let mine = event(5, "Advanced", "canary weight 5% → 25%");
        let mut other = event(6, "RolledBack", "another release");
        other.regarding.as_mut().unwrap().name = Some("lobe-chat-2".into());
        let mut pod = event(7, "Scheduled", "a pod of the same name");
        pod.regarding.as_mut().unwrap().kind = Some("Pod".into());
        let about: Vec<Event> = [mine, other, pod]
            .into_iter()
            .filter(|e| is_about(e, "lobe-chat"))
            .collect();
        assert_eq!(
            about.len(),
            1,
            "only Events regarding ChatRelease lobe-chat"
        );

        let release = progressing();
        let view = render_status_with_events(&release, &about);
        let status = render_status(&release);
        assert!(view.starts_with(&status), "{view}");
        let events = &view[status.len()..];
        assert!(events.contains("Recent events"), "{view}");
        assert!(
            events.contains("Advanced") && events.contains("5% → 25%"),
            "{view}"
        );
        assert!(!view.contains("another release"), "{view}");
    }

    #[test]
    fn events_show_the_last_eight_newest_last_with_time_type_reason_and_note() {
        // Given out of order: the view sorts by time.
        let mut events: Vec<Event> = (0..10)
            .rev()
            .map(|i| event(i, &format!("Step{i}"), &format!("advanced at {i}")))
            .collect();
        events.push(event(30, "RolledBack", &"y".repeat(100)));
        let text = render_events(&events);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Recent events", "{text}");
        for header in ["TIME", "TYPE", "REASON", "NOTE"] {
            assert!(lines[1].contains(header), "{header} missing: {text}");
        }
        assert_eq!(lines.len(), 2 + 8, "{text}");
        assert!(!text.contains("Step2 "), "the oldest are dropped: {text}");
        assert!(
            lines[2].contains("Step3") && lines[2].contains("advanced at 3"),
            "{text}"
        );
        assert!(
            lines[2].contains("2025-11-21T10:00:03Z "),
            "whole seconds: {text}"
        );
        let last = lines[9];
        assert!(
            last.contains("Warning") && last.contains("RolledBack"),
            "{text}"
        );
        assert!(last.ends_with("..."), "{text}");
        assert!(!last.contains(&"y".repeat(61)), "{text}");

        assert_eq!(render_events(&[]), "Recent events: none\n");
    }

    #[test]
    fn list_takes_all_namespaces_or_one() {
        let cli = Cli::try_parse_from(["kubectl-chatrelease", "list", "-A"]);
        assert!(matches!(
            cli.map(|c| c.command),
            Ok(CliCommand::List {
                all_namespaces: true
            })
        ));
        let cli = Cli::try_parse_from(["kubectl-chatrelease", "list", "-n", "chat"]);
        assert!(cli.is_ok_and(|c| c.namespace.as_deref() == Some("chat")));
        assert!(Cli::try_parse_from(["kubectl-chatrelease", "list", "-A", "-n", "chat"]).is_err());
    }

    #[test]
    fn status_shows_phase_step_weight_and_both_tracks() {
        let view = render_status(&progressing());
        assert!(view.starts_with("ChatRelease chat/lobe-chat\n"), "{view}");
        assert!(view.contains("  Phase     Progressing\n"), "{view}");
        assert!(
            view.contains(
                "  Step      2/4 at 25%  [#####...............]  (steps 5, 25, 50, gate 100)\n"
            ),
            "{view}"
        );
        assert!(
            view.contains("  Stable    lobehub/lobe-chat:v1.8.0  (revision 5d8f9c2a01)\n"),
            "{view}"
        );
        assert!(
            view.contains("  Canary    lobehub/lobe-chat:v1.9.0  (revision 7b1e0f3c44)\n"),
            "{view}"
        );
        assert!(
            view.contains("  Failures  0 in a row (rolls back at 2)\n"),
            "{view}"
        );
        assert!(
            view.contains("  Message   analysis passed at 5%: advanced to 25%\n"),
            "{view}"
        );
    }

    #[test]
    fn status_shows_the_last_analysis_as_an_aligned_table() {
        let view = render_status(&progressing());
        let expected = "\
Last analysis: pass at 5% (2025-11-21T10:01:00Z), 2000 canary / 38000 stable requests
  CHECK        CANARY  STABLE  BOUND      VERDICT
  error-rate   0.2%    0.2%    <= 1%      pass
  latency-p99  800ms   780ms   <= 3000ms  pass
  all checks within bounds
";
        assert!(view.contains(expected), "{view}");
    }

    #[test]
    fn status_lists_the_conditions() {
        let view = render_status(&progressing());
        assert!(
            view.contains(
                "Conditions\n  TYPE         STATUS  REASON       SINCE                 MESSAGE\n"
            ),
            "{view}"
        );
        assert!(
            view.contains("  Ready        True    Progressing  2025-11-21T10:00:00Z  analysis passed at 5%: advanced to 25%\n"),
            "{view}"
        );
        assert!(
            !view.lines().any(|l| l.ends_with(' ')),
            "trailing spaces:\n{view}"
        );
    }

    #[test]
    fn a_long_condition_message_is_cut_in_the_table_and_whole_on_the_message_line() {
        let mut release = progressing();
        let status = release.status.as_mut().expect("fixture has a status");
        let long = format!("holding at 5%: {}", "z".repeat(100));
        status.message = long.clone();
        for condition in &mut status.conditions {
            condition.message = long.clone();
        }
        let view = render_status(&release);
        assert!(view.contains(&format!("Message   {long}")), "{view}");
        let conditions = view
            .split("Conditions\n")
            .nth(1)
            .expect("a conditions table");
        assert!(!conditions.contains(&long), "{view}");
        assert!(
            conditions.lines().skip(1).all(|l| l.ends_with("...")),
            "{view}"
        );
    }

    #[test]
    fn status_tells_how_to_pass_a_manual_gate() {
        let mut release = progressing();
        let status = release.status.as_mut().expect("fixture has a status");
        status.phase = Phase::Paused;
        status.pause_reason = Some(PauseReason::ManualGate);
        let view = render_status(&release);
        assert!(
            view.contains(
                "  Phase     Paused at a manual gate: kubectl chatrelease promote lobe-chat\n"
            ),
            "{view}"
        );
    }

    #[test]
    fn status_without_status_asks_whether_the_operator_runs() {
        let mut release = progressing();
        release.status = None;
        let view = render_status(&release);
        assert!(
            view.contains("Initializing (no status yet: is the operator running?)"),
            "{view}"
        );
        assert!(
            view.contains("  Step      -/4 at 0%  [....................]"),
            "{view}"
        );
        assert!(view.contains("  Stable    -\n  Canary    -\n"), "{view}");
        assert!(view.contains("  Message   -\n"), "{view}");
        assert!(view.contains("Last analysis: none yet"), "{view}");
        assert!(view.contains("Conditions: none yet"), "{view}");
    }

    fn at(time: &str) -> jiff::Zoned {
        time.parse::<jiff::Timestamp>()
            .expect("a valid timestamp")
            .to_zoned(jiff::tz::TimeZone::UTC)
    }

    #[test]
    fn timeline_line_shows_time_phase_weight_the_new_analysis_and_the_message() {
        let line = timeline_line(None, &progressing(), &at("2025-11-21T10:01:02Z"));
        assert_eq!(
            line.as_deref(),
            Some(
                "10:01:02  Progressing  25%  [analysis pass at 5%, 2000 canary / 38000 stable requests: \
                 error-rate canary 0.2% vs stable 0.2% (<= 1%) pass; \
                 latency-p99 canary 800ms vs stable 780ms (<= 3000ms) pass] \
                 analysis passed at 5%: advanced to 25%"
            )
        );
    }

    #[test]
    fn timeline_appends_a_line_only_when_something_it_shows_changed() {
        let release = progressing();
        let seen = release.status.clone();
        let now = at("2025-11-21T10:01:05Z");
        // A status write that changes nothing shown (conditions, resourceVersion): no line.
        assert_eq!(timeline_line(seen.as_ref(), &release, &now), None);

        // The message changes, the analysis is the one already shown: no analysis repeated.
        let mut paused = release.clone();
        let status = paused.status.as_mut().expect("fixture has a status");
        status.phase = Phase::Paused;
        status.pause_reason = Some(PauseReason::ManualGate);
        status.message = "waiting at the manual gate before 100%".into();
        assert_eq!(
            timeline_line(seen.as_ref(), &paused, &now).as_deref(),
            Some("10:01:05  Paused       25%  waiting at the manual gate before 100%")
        );

        // A new analysis is shown even when phase, weight and message stay the same.
        let mut again = release.clone();
        let analysis = again
            .status
            .as_mut()
            .and_then(|s| s.last_analysis.as_mut())
            .expect("fixture has an analysis");
        analysis.time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2025-11-21T10:02:00Z".parse().expect("a valid timestamp"),
        );
        analysis.verdict = crate::crd::Verdict::Inconclusive;
        analysis.checks.clear();
        let line = timeline_line(seen.as_ref(), &again, &now).expect("a new analysis");
        assert!(
            line.starts_with(
                "10:01:05  Progressing  25%  [analysis inconclusive at 5%, 2000 canary / 38000 stable requests] "
            ),
            "{line}"
        );
    }

    #[test]
    fn timeline_without_status_asks_whether_the_operator_runs() {
        let mut release = progressing();
        release.status = None;
        assert_eq!(
            timeline_line(None, &release, &at("2025-11-21T10:00:00Z")).as_deref(),
            Some("10:00:00  Initializing  0%  no status yet: is the operator running?")
        );
    }

    #[test]
    fn timeline_needs_watch() {
        let parsed = <Cli as clap::Parser>::try_parse_from([
            "kubectl-chatrelease",
            "status",
            "lobe-chat",
            "--timeline",
        ]);
        assert!(parsed.is_err());
        let cli = <Cli as clap::Parser>::parse_from([
            "kubectl-chatrelease",
            "status",
            "lobe-chat",
            "--watch",
            "--timeline",
        ]);
        assert!(matches!(
            cli.command,
            CliCommand::Status {
                watch: true,
                timeline: true,
                ..
            }
        ));
    }

    #[test]
    fn weight_bar_rounds_to_the_nearest_five_percent() {
        assert_eq!(weight_bar(0), "[....................]");
        assert_eq!(weight_bar(5), "[#...................]");
        assert_eq!(weight_bar(50), "[##########..........]");
        assert_eq!(weight_bar(100), "[####################]");
        assert_eq!(weight_bar(250), weight_bar(100));
    }

    #[test]
    fn steering_sets_the_annotation_to_true_with_a_merge_patch() {
        assert_eq!(
            steer_patch(Steer::Set(Command::Rollback)),
            serde_json::json!({"metadata": {"annotations": {"chatrelease.io/rollback": "true"}}})
        );
        assert_eq!(
            steer_patch(Steer::Set(Command::Promote)),
            serde_json::json!({"metadata": {"annotations": {"chatrelease.io/promote": "true"}}})
        );
    }

    #[test]
    fn resume_removes_the_pause_annotation_with_null() {
        assert_eq!(
            steer_patch(Steer::Resume),
            serde_json::json!({"metadata": {"annotations": {"chatrelease.io/pause": null}}})
        );
    }

    #[test]
    fn steering_says_what_was_done_and_what_follows() {
        assert_eq!(
            steer_message(Steer::Set(Command::Rollback), "chat", "lobe-chat"),
            "chatrelease.io/rollback set on chat/lobe-chat; the operator moves all traffic to stable on its next reconcile\n"
        );
        assert!(
            steer_message(Steer::Set(Command::Pause), "chat", "lobe-chat")
                .contains("kubectl chatrelease resume lobe-chat")
        );
        assert!(
            steer_message(Steer::Resume, "chat", "lobe-chat")
                .starts_with("chatrelease.io/pause removed from chat/lobe-chat;")
        );
    }

    #[test]
    fn a_missing_object_is_reported_by_name() {
        let status =
            kube::core::Status::failure("chatreleases \"lobe-chat\" not found", "NotFound")
                .with_code(404);
        let err = CliError::api(
            "get",
            "chat",
            "lobe-chat",
            kube::Error::Api(Box::new(status)),
        );
        assert!(
            err.to_string()
                .starts_with("ChatRelease chat/lobe-chat not found"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn a_bad_scenario_exits_2_and_names_the_field() {
        let path =
            std::env::temp_dir().join(format!("chatrelease-cli-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"release": 3, "ticks": []}"#).expect("temp file");
        let err = simulate_file(&path).expect_err("not a scenario");
        let _ = std::fs::remove_file(&path);
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().starts_with("release:"), "{err}");

        let missing =
            simulate_file(Path::new("/nonexistent/scenario.json")).expect_err("no such file");
        assert_eq!(missing.exit_code(), 2);
        assert!(
            missing
                .to_string()
                .starts_with("/nonexistent/scenario.json: "),
            "{missing}"
        );
    }

    #[test]
    fn only_simulate_works_without_a_cluster() {
        let cli = <Cli as clap::Parser>::parse_from(["kubectl-chatrelease", "simulate", "s.json"]);
        assert!(!cli.command.talks_to_cluster());
        let cli = <Cli as clap::Parser>::parse_from([
            "kubectl-chatrelease",
            "status",
            "lobe-chat",
            "-n",
            "chat",
            "--watch",
        ]);
        assert!(cli.command.talks_to_cluster());
        assert_eq!(cli.namespace.as_deref(), Some("chat"));
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[tokio::test]
    async fn a_client_starts_once_the_crypto_provider_is_installed() {
        install_crypto_provider();
        // A second install (another command path, a test) must be harmless.
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        let url = "https://127.0.0.1:1".parse().expect("a valid URL");
        let client = Client::try_from(kube::Config::new(url));
        assert!(client.is_ok(), "{:?}", client.err());
    }
}
