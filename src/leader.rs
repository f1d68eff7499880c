//! Leader election on a Lease, so that of all replicas exactly one writes: the replica holding
//! the Lease runs the controller, the others stand by and take over once it stops renewing.
//!
//! kube-lease-manager acquires, renews and releases the Lease. Around it this file adds what
//! "never two writers" needs when the API server is slow or unreachable: the leader reads the
//! Lease itself and stops its controller when the last renewal it could read is about to run out,
//! whatever the lease manager is doing (a renewal stuck in a hung request would otherwise let the
//! old leader write on after a standby took over). A standby also reads the Lease, so that a
//! Lease released on shutdown is taken over at once rather than when it would have expired.
//!
//! A replica that loses leadership does not stand by again: [`Leadership::run_when_leader`]
//! stops the controller and returns [`LeaderError::Lost`], and the process exits. The restarted
//! process starts as a standby with empty caches, no reconcile half done and no requeue left from
//! the time it led, the way controller-runtime and client-go operators handle a lost lease.

use futures::future::OptionFuture;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerError, LeaseParams};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// The Lease the replicas elect a leader with, unless `--lease-name` says otherwise.
pub const DEFAULT_LEASE_NAME: &str = "chatrelease-operator";
/// Namespace of the Lease outside a Pod (in a Pod, `POD_NAMESPACE` from the downward API).
pub const DEFAULT_LEASE_NAMESPACE: &str = "default";
/// How long a Lease stays valid after its last renewal; a standby takes over after that.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews the Lease.
pub const DEFAULT_RENEW_INTERVAL: Duration = Duration::from_secs(5);

/// Longest a graceful shutdown waits for the Lease to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before retrying a Lease call that failed; it doubles up to the renew interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// Which Lease to hold, as whom, and how fast to renew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    pub lease_name: String,
    pub namespace: String,
    /// This replica's name in the Lease's `holderIdentity`; unique among the replicas.
    pub identity: String,
    /// How long the Lease stays valid after a renewal. Whole seconds (the Lease stores seconds).
    pub lease_duration: Duration,
    /// How often the leader renews. Whole seconds, at most a third of `lease_duration`: the
    /// leader stops one renew interval before its last renewal runs out, which leaves that much
    /// for clock skew between nodes and for writes already on their way.
    pub renew_interval: Duration,
}

impl LeaderElection {
    /// The default Lease in the default namespace, held as `identity`.
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            lease_name: DEFAULT_LEASE_NAME.into(),
            namespace: DEFAULT_LEASE_NAMESPACE.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_interval: DEFAULT_RENEW_INTERVAL,
        }
    }

    /// `namespace/name` of the Lease, for logs and errors.
    pub fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.lease_name)
    }

    fn timing(&self) -> Result<Timing, LeaderError> {
        for (what, value) in [
            ("lease name", &self.lease_name),
            ("lease namespace", &self.namespace),
            ("identity", &self.identity),
        ] {
            if value.trim().is_empty() {
                return Err(LeaderError::Empty(what));
            }
        }
        let whole = |d: Duration| d.subsec_nanos() == 0 && d.as_secs() > 0;
        let (lease, renew) = (self.lease_duration, self.renew_interval);
        if !whole(lease) || !whole(renew) || lease.as_secs() < 3 * renew.as_secs() {
            return Err(LeaderError::Timing {
                lease_duration: lease,
                renew_interval: renew,
            });
        }
        Ok(Timing {
            lease_secs: lease.as_secs(),
            // kube-lease-manager renews `grace` before expiry: once every renew interval.
            grace_secs: lease.as_secs() - renew.as_secs(),
            renew,
        })
    }
}

/// Checked timings, in the whole seconds a Lease records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    lease_secs: u64,
    grace_secs: u64,
    renew: Duration,
}

impl Timing {
    /// Every replica reads the Lease twice per renewal interval: the leader to see each renewal
    /// well before the previous one runs out, a standby to notice a release within seconds.
    fn read_interval(&self) -> Duration {
        self.renew / 2
    }

    /// How long before a renewal runs out the leader stops writing.
    fn hold_margin(&self) -> Duration {
        self.renew
    }
}

/// Command-line options for leader election, to `#[command(flatten)]` into `run`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaderElectionArgs {
    /// Run without leader election, for a single replica or a local run. Two replicas started
    /// this way both write.
    #[arg(long)]
    pub no_leader_election: bool,
    /// Name of the Lease the replicas elect a leader with.
    #[arg(long, default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// Namespace of the Lease; in a Pod, its own namespace from the downward API.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_LEASE_NAMESPACE)]
    pub lease_namespace: String,
    /// This replica's identity in the Lease. Default: $POD_NAME, else hostname-pid.
    #[arg(long, env = "POD_NAME")]
    pub leader_identity: Option<String>,
    /// How long the Lease stays valid after a renewal; a standby takes over after that.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How often the leader renews the Lease (at most a third of --lease-duration).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_renew_interval: Duration,
}

impl LeaderElectionArgs {
    /// The election these options ask for, `None` with `--no-leader-election`.
    pub fn election(&self) -> Result<Option<LeaderElection>, LeaderError> {
        if self.no_leader_election {
            return Ok(None);
        }
        let election = LeaderElection {
            lease_name: self.lease_name.clone(),
            namespace: self.lease_namespace.clone(),
            identity: self
                .leader_identity
                .clone()
                .filter(|identity| !identity.trim().is_empty())
                .unwrap_or_else(default_identity),
            lease_duration: self.lease_duration,
            renew_interval: self.lease_renew_interval,
        };
        election.timing()?;
        Ok(Some(election))
    }
}

/// This replica's identity when none is given: `$POD_NAME`, else `hostname-pid`.
pub fn default_identity() -> String {
    identity_from(
        std::env::var("POD_NAME").ok(),
        hostname(),
        std::process::id(),
    )
}

fn identity_from(pod_name: Option<String>, hostname: Option<String>, pid: u32) -> String {
    let named = |s: &Option<String>| s.as_ref().is_some_and(|s| !s.trim().is_empty());
    match (pod_name, hostname) {
        (Some(pod), _) if !pod.trim().is_empty() => pod.trim().to_string(),
        (_, host) if named(&host) => format!("{}-{pid}", host.unwrap_or_default().trim()),
        _ => format!("{DEFAULT_LEASE_NAME}-{pid}"),
    }
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// The Lease names another replica.
    TakenOver,
    /// No renewal could be confirmed before the last one ran out.
    NotRenewed,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::TakenOver => "another replica holds the Lease",
            LostReason::NotRenewed => {
                "no renewal could be confirmed before the last one ran out (is the API server reachable?)"
            }
        })
    }
}

/// What can end leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "leader election: lease duration {lease_duration:?} and renew interval {renew_interval:?} must be whole seconds, and the lease at least three renew intervals long (e.g. 15s and 5s)"
    )]
    Timing {
        lease_duration: Duration,
        renew_interval: Duration,
    },
    #[error("leader election: the {0} must not be empty")]
    Empty(&'static str),
    /// The Lease could not be read or created at start.
    #[error(
        "leader election: cannot use Lease {lease}: {source}; check that the namespace exists and that the service account may get, create and patch leases.coordination.k8s.io there"
    )]
    Lease {
        lease: String,
        #[source]
        source: Box<LeaseManagerError>,
    },
    /// This replica led and no longer does; its controller has been stopped. Exit, so that the
    /// replica comes back as a standby.
    #[error("{identity} lost leadership of Lease {lease}: {reason}; the controller was stopped")]
    Lost {
        lease: String,
        identity: String,
        reason: LostReason,
    },
}

/// Whether this replica is the leader, for anyone who wants to know (metrics, logs).
#[derive(Debug)]
pub struct Leadership {
    leader: watch::Sender<bool>,
}

impl Default for Leadership {
    fn default() -> Self {
        Self::new()
    }
}

impl Leadership {
    /// Not the leader yet.
    pub fn new() -> Self {
        Self {
            leader: watch::Sender::new(false),
        }
    }

    /// `true` exactly while this replica runs the controller.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    fn set(&self, leader: bool) {
        self.leader.send_replace(leader);
    }

    /// Runs `leading` (the controller) only while this replica holds the Lease of `election`.
    ///
    /// Stands by until the Lease is free or expired, takes it, and starts `leading`. Renews the
    /// Lease while `leading` runs; if the Lease is taken over or cannot be renewed in time,
    /// `leading` is dropped (no further writes) and `Err(LeaderError::Lost)` comes back: exit
    /// the process then. When `shutdown` completes while standing by, returns `Ok`. When it
    /// completes while leading, the Lease is held until `leading` has finished (it is expected
    /// to stop on the same signal, as `controller::run` does), then released so that a standby
    /// takes over at once, and `Ok` comes back; the same when `leading` ends by itself.
    ///
    /// With `election` `None` (`--no-leader-election`) runs `leading` at once, as the leader.
    pub async fn run_when_leader<F, Fut, S>(
        &self,
        client: Client,
        election: Option<&LeaderElection>,
        leading: F,
        shutdown: S,
    ) -> Result<(), LeaderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
        S: Future<Output = ()>,
    {
        let Some(election) = election else {
            info!("leader election disabled: this replica writes without holding a Lease");
            let _stepped_down = SteppedDown(self);
            self.set(true);
            leading().await;
            return Ok(());
        };
        let elector = Elector {
            timing: election.timing()?,
            leases: Api::namespaced(client.clone(), &election.namespace),
            client,
            election,
            leadership: self,
        };
        // Not the leader any more however this ends, dropped mid-way included.
        let _stepped_down = SteppedDown(self);
        elector.run(leading, shutdown).await
    }
}

/// Reports "not the leader" when dropped.
struct SteppedDown<'a>(&'a Leadership);

impl Drop for SteppedDown<'_> {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

/// Completes on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    () = ctrl_c => {}
                }
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// How much longer `identity` may act as leader according to `lease` read at `now`: until
/// `margin` before its last renewal runs out, so that a standby whose clock runs up to `margin`
/// ahead still finds the Lease held while this replica writes. `None` when the Lease names
/// another holder or none, or that moment has passed.
pub fn remaining_hold(
    lease: &Lease,
    identity: &str,
    margin: Duration,
    now: Timestamp,
) -> Option<Duration> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0;
    let valid = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    let until = renewed.checked_add(valid.saturating_sub(margin)).ok()?;
    Duration::try_from(now.duration_until(until))
        .ok()
        .filter(|left| !left.is_zero())
}

/// What one read of the Lease means for this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reading {
    /// Who holds the Lease.
    holder: Option<String>,
    /// How much longer this replica may write (see [`remaining_hold`]).
    held_for: Option<Duration>,
    /// Why a leader must stop now, if it must.
    lost: Option<LostReason>,
    /// The Lease was held by another replica at the previous read and is free now.
    released: bool,
}

impl Reading {
    fn of(
        lease: &Lease,
        identity: &str,
        margin: Duration,
        now: Timestamp,
        previous: Option<&str>,
    ) -> Self {
        let holder = holder_of(lease).map(str::to_string);
        let held_for = remaining_hold(lease, identity, margin, now);
        let lost = match (&held_for, holder.as_deref()) {
            (Some(_), _) => None,
            (None, Some(holder)) if holder == identity => Some(LostReason::NotRenewed),
            (None, _) => Some(LostReason::TakenOver),
        };
        Self {
            released: holder.is_none() && previous.is_some_and(|previous| previous != identity),
            holder,
            held_for,
            lost,
        }
    }
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|holder| !holder.is_empty())
}

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Waits that double after each failure, up to a cap.
struct Retry {
    next: Duration,
    cap: Duration,
}

impl Retry {
    fn new(cap: Duration) -> Self {
        Self {
            next: FIRST_RETRY.min(cap),
            cap,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY.min(self.cap);
    }

    fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.cap);
        wait
    }
}

struct Elector<'a> {
    client: Client,
    election: &'a LeaderElection,
    timing: Timing,
    leases: Api<Lease>,
    leadership: &'a Leadership,
}

impl Elector<'_> {
    async fn manager(&self) -> Result<Arc<LeaseManager>, LeaderError> {
        let params = LeaseParams::new(
            self.election.identity.clone(),
            self.timing.lease_secs,
            self.timing.grace_secs,
        );
        LeaseManager::new(
            self.client.clone(),
            &self.election.lease_name,
            &self.election.namespace,
            params,
            LeaseCreateMode::AutoCreate,
        )
        .await
        .map(Arc::new)
        .map_err(|source| LeaderError::Lease {
            lease: self.election.lease(),
            source: Box::new(source),
        })
    }

    /// The lease manager's next change of heart, after `after`. It renews the Lease while it
    /// waits, so exactly one of these is kept alive at a time and never cancelled mid-way
    /// except to release or to start over.
    fn next_change(
        manager: &Arc<LeaseManager>,
        after: Duration,
    ) -> Boxed<Result<bool, LeaseManagerError>> {
        let manager = manager.clone();
        Box::pin(async move {
            tokio::time::sleep(after).await;
            manager.changed().await
        })
    }

    fn next_read(&self, after: Duration, timeout: Duration) -> Boxed<Result<Lease, ReadError>> {
        let leases = self.leases.clone();
        let name = self.election.lease_name.clone();
        Box::pin(async move {
            tokio::time::sleep(after).await;
            match tokio::time::timeout(timeout, leases.get(&name)).await {
                Ok(read) => Ok(read?),
                Err(_) => Err(ReadError::Timeout(timeout)),
            }
        })
    }

    async fn run<F, Fut, S>(self, leading: F, shutdown: S) -> Result<(), LeaderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
        S: Future<Output = ()>,
    {
        let identity = self.election.identity.as_str();
        let lease = self.election.lease();
        let read_interval = self.timing.read_interval();
        let mut manager = self.manager().await?;
        let mut change = Self::next_change(&manager, Duration::ZERO);
        let mut read = self.next_read(Duration::ZERO, read_interval);
        let mut retry = Retry::new(self.timing.renew);
        let mut shutdown = pin!(shutdown);
        let mut leading = Some(leading);
        let mut work: Option<Pin<Box<Fut>>> = None;
        // The lease manager's last word: this replica holds the Lease.
        let mut holder = false;
        // Until when the Lease as last read lets this replica write.
        let mut held_until: Option<Instant> = None;
        // Who held the Lease at the last read.
        let mut seen_holder: Option<String> = None;
        let mut draining = false;
        info!(%identity, %lease, "standing by for leadership");

        loop {
            let deadline = held_until.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                () = &mut shutdown, if !draining => {
                    if work.is_none() {
                        info!(%identity, %lease, "shutting down while standing by");
                        drop(change);
                        self.release(&manager, held_until).await;
                        return Ok(());
                    }
                    info!(%identity, %lease, "shutting down: holding the Lease until the controller stops");
                    draining = true;
                }
                Some(()) = OptionFuture::from(work.as_mut()), if work.is_some() => {
                    // Nothing writes any more: hand over.
                    self.leadership.set(false);
                    info!(%identity, %lease, "controller stopped; releasing the Lease");
                    drop(change);
                    self.release(&manager, held_until).await;
                    return Ok(());
                }
                result = &mut change => {
                    let mut after = Duration::ZERO;
                    match result {
                        Ok(true) => {
                            holder = true;
                            retry.reset();
                            debug!(%identity, %lease, "lease manager took the Lease; confirming it");
                            read = self.next_read(Duration::ZERO, read_interval);
                        }
                        Ok(false) => {
                            holder = false;
                            held_until = None;
                            retry.reset();
                            if work.is_some() {
                                return Err(self.lose(&mut work, LostReason::TakenOver));
                            }
                        }
                        Err(error) => {
                            after = retry.wait();
                            warn!(%identity, %lease, %error, retry_in = ?after, "Lease call failed");
                        }
                    }
                    change = Self::next_change(&manager, after);
                }
                result = &mut read => {
                    match result {
                        Ok(read) => {
                            let margin = self.timing.hold_margin();
                            let previous = seen_holder.as_deref();
                            let reading = Reading::of(&read, identity, margin, Timestamp::now(), previous);
                            held_until = reading.held_for.map(|left| Instant::now() + left);
                            if work.is_some() && let Some(reason) = reading.lost {
                                return Err(self.lose(&mut work, reason));
                            }
                            if reading.released && !holder {
                                // Released by its holder (or cleared by a standby after it expired):
                                // the lease manager would wait for the expiry it last read; start
                                // it over, and it takes the free Lease at once.
                                let previous = previous.unwrap_or_default();
                                info!(%identity, %lease, previous, "the Lease is free; taking it");
                                match self.manager().await {
                                    Ok(fresh) => {
                                        manager = fresh;
                                        change = Self::next_change(&manager, Duration::ZERO);
                                    }
                                    Err(error) => {
                                        warn!(%identity, %lease, %error, "cannot restart the lease manager")
                                    }
                                }
                            }
                            seen_holder = reading.holder;
                        }
                        Err(error) => warn!(%identity, %lease, %error, "cannot read the Lease"),
                    }
                    read = self.next_read(read_interval, read_interval);
                }
                () = tokio::time::sleep_until(deadline), if work.is_some() => {
                    return Err(self.lose(&mut work, LostReason::NotRenewed));
                }
            }
            let confirmed = held_until.is_some_and(|until| until > Instant::now());
            if work.is_none()
                && !draining
                && holder
                && confirmed
                && let Some(start) = leading.take()
            {
                info!(%identity, %lease, "became the leader; starting the controller");
                self.leadership.set(true);
                work = Some(Box::pin(start()));
            }
        }
    }

    /// Stops the controller at once and says why.
    fn lose<Fut>(&self, work: &mut Option<Pin<Box<Fut>>>, reason: LostReason) -> LeaderError {
        self.leadership.set(false);
        drop(work.take());
        let (identity, lease) = (&self.election.identity, self.election.lease());
        info!(%identity, %lease, %reason, "lost leadership; controller stopped");
        LeaderError::Lost {
            lease,
            identity: identity.clone(),
            reason,
        }
    }

    /// Frees the Lease so that a standby takes over now rather than when it expires. Only while
    /// the last read confirms this replica's hold: the lease manager clears the holder it
    /// believes in, and after a takeover that would be the new leader. Best effort: if it
    /// fails, a standby takes over when the Lease expires.
    async fn release(&self, manager: &LeaseManager, held_until: Option<Instant>) {
        if held_until.is_none_or(|until| until <= Instant::now()) {
            return;
        }
        let (identity, lease) = (&self.election.identity, self.election.lease());
        match tokio::time::timeout(RELEASE_TIMEOUT, manager.release()).await {
            Ok(Ok(())) => info!(%identity, %lease, "released the Lease"),
            Ok(Err(error)) => {
                warn!(%identity, %lease, %error, "cannot release the Lease; a standby takes over when it expires")
            }
            Err(_) => {
                warn!(%identity, %lease, "releasing the Lease timed out; a standby takes over when it expires")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde_json::{Map, Value, json};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::sync::oneshot;

    const ME: &str = "replica-a";
    const OTHER: &str = "replica-b";

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("timestamp")
    }

    fn lease(holder: Option<&str>, renewed: Timestamp, seconds: i32) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(renewed)),
                lease_duration_seconds: Some(seconds),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_leader_may_write_until_one_margin_before_its_renewal_runs_out() {
        let held = lease(Some(ME), at(1_000), 15);
        let margin = Duration::from_secs(5);
        assert_eq!(
            remaining_hold(&held, ME, margin, at(1_000)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            remaining_hold(&held, ME, margin, at(1_009)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(remaining_hold(&held, ME, margin, at(1_010)), None);
        assert_eq!(remaining_hold(&held, ME, margin, at(2_000)), None);
    }

    #[test]
    fn a_lease_held_by_another_or_by_nobody_lets_nobody_write() {
        let margin = Duration::from_secs(5);
        let now = at(1_000);
        assert_eq!(
            remaining_hold(&lease(Some(OTHER), now, 15), ME, margin, now),
            None
        );
        assert_eq!(remaining_hold(&lease(None, now, 15), ME, margin, now), None);
        assert_eq!(remaining_hold(&Lease::default(), ME, margin, now), None);
        let mut no_duration = lease(Some(ME), now, 15);
        if let Some(spec) = no_duration.spec.as_mut() {
            spec.lease_duration_seconds = None;
        }
        assert_eq!(remaining_hold(&no_duration, ME, margin, now), None);
    }

    #[test]
    fn a_read_tells_a_leader_to_stop_when_its_hold_ran_out_or_another_holds_the_lease() {
        let margin = Duration::from_secs(5);
        let now = at(1_000);
        let of = |lease: &Lease, now, previous| Reading::of(lease, ME, margin, now, previous);
        let mine = lease(Some(ME), now, 15);
        assert_eq!(
            of(&mine, now, Some(ME)),
            Reading {
                holder: Some(ME.into()),
                held_for: Some(Duration::from_secs(10)),
                lost: None,
                released: false
            }
        );
        assert_eq!(
            of(&mine, at(1_011), Some(ME)).lost,
            Some(LostReason::NotRenewed)
        );
        let theirs = lease(Some(OTHER), now, 15);
        assert_eq!(of(&theirs, now, Some(ME)).lost, Some(LostReason::TakenOver));
        let free = lease(None, now, 15);
        assert_eq!(of(&free, now, Some(ME)).lost, Some(LostReason::TakenOver));
    }

    #[test]
    fn a_read_tells_a_standby_when_the_leader_released_the_lease() {
        let margin = Duration::from_secs(5);
        let now = at(1_000);
        let free = lease(None, now, 15);
        let of = |previous| Reading::of(&free, ME, margin, now, previous).released;
        assert!(of(Some(OTHER)));
        assert!(
            !of(None),
            "free at start: the lease manager takes it anyway"
        );
        assert!(!of(Some(ME)), "this replica released it");
        assert!(!Reading::of(&lease(Some(OTHER), now, 15), ME, margin, now, Some(OTHER)).released);
    }

    #[test]
    fn the_defaults_renew_every_five_seconds_a_lease_of_fifteen() {
        let timing = LeaderElection::new(ME)
            .timing()
            .expect("defaults are valid");
        assert_eq!(
            timing,
            Timing {
                lease_secs: 15,
                grace_secs: 10,
                renew: Duration::from_secs(5)
            }
        );
        assert_eq!(timing.read_interval(), Duration::from_millis(2_500));
        assert_eq!(timing.hold_margin(), Duration::from_secs(5));
    }

    #[test]
    fn timings_a_lease_cannot_record_or_that_leave_no_margin_are_refused() {
        for (lease, renew) in [
            (15_000, 5_500),
            (15_500, 5_000),
            (15_000, 0),
            (10_000, 5_000),
        ] {
            let election = LeaderElection {
                lease_duration: Duration::from_millis(lease),
                renew_interval: Duration::from_millis(renew),
                ..LeaderElection::new(ME)
            };
            assert!(
                matches!(election.timing(), Err(LeaderError::Timing { .. })),
                "{lease}ms / {renew}ms accepted"
            );
        }
        let election = LeaderElection {
            identity: " ".into(),
            ..LeaderElection::new(ME)
        };
        assert!(matches!(
            election.timing(),
            Err(LeaderError::Empty("identity"))
        ));
    }

    #[test]
    fn the_identity_is_the_pod_name_else_hostname_and_pid() {
        assert_eq!(
            identity_from(Some("op-7d9f-x2".into()), Some("node".into()), 42),
            "op-7d9f-x2"
        );
        assert_eq!(
            identity_from(None, Some("laptop\n".into()), 42),
            "laptop-42"
        );
        assert_eq!(
            identity_from(Some(" ".into()), None, 42),
            "chatrelease-operator-42"
        );
    }

    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        election: LeaderElectionArgs,
    }

    #[test]
    fn the_command_line_builds_the_election_or_skips_it() {
        let run = Run::parse_from([
            "run",
            "--lease-namespace",
            "chatrelease-system",
            "--leader-identity",
            "pod-1",
            "--lease-duration",
            "30s",
            "--lease-renew-interval",
            "10s",
        ]);
        assert_eq!(
            run.election.election().expect("valid"),
            Some(LeaderElection {
                lease_name: "chatrelease-operator".into(),
                namespace: "chatrelease-system".into(),
                identity: "pod-1".into(),
                lease_duration: Duration::from_secs(30),
                renew_interval: Duration::from_secs(10),
            })
        );
        let run = Run::parse_from(["run", "--no-leader-election"]);
        assert_eq!(run.election.election().expect("valid"), None);
        let run = Run::parse_from(["run", "--lease-renew-interval", "6s"]);
        assert!(run.election.election().is_err());
    }

    /// An API server holding one Lease: reads it, creates it, merges patches into its spec
    /// (enough of strategic merge and apply for the flat fields of a Lease), or answers 503 to
    /// everything while `down`.
    #[derive(Clone, Default)]
    struct LeaseServer {
        spec: Arc<Mutex<Option<Map<String, Value>>>>,
        down: Arc<AtomicBool>,
    }

    impl LeaseServer {
        fn client(&self) -> Client {
            let server = self.clone();
            crate::fixtures::client_answered_by("default", move |method, _uri, body| {
                server.answer(method, body)
            })
        }

        fn answer(&self, method: &str, body: &Value) -> (u16, Value) {
            let status = |code: u16, reason: &str| {
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": reason, "reason": reason, "code": code});
                (code, status)
            };
            if self.down.load(Ordering::SeqCst) {
                return status(503, "ServiceUnavailable");
            }
            let mut stored = self.spec.lock().expect("lease lock");
            match (method, stored.as_mut()) {
                ("GET", None) | ("PATCH", None) => return status(404, "NotFound"),
                ("POST", _) => *stored = Some(Map::new()),
                ("PATCH", Some(spec)) => {
                    if let Some(changes) = body.get("spec").and_then(Value::as_object) {
                        for (field, value) in changes {
                            if value.is_null() {
                                spec.remove(field);
                            } else {
                                spec.insert(field.clone(), value.clone());
                            }
                        }
                    }
                }
                _ => {}
            }
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": DEFAULT_LEASE_NAME, "namespace": "default"},
                "spec": stored.clone().unwrap_or_default()});
            (200, lease)
        }

        fn holder(&self) -> Option<String> {
            let spec = self.spec.lock().expect("lease lock");
            spec.as_ref()?
                .get("holderIdentity")?
                .as_str()
                .map(str::to_string)
        }

        fn renewed(&self) -> Option<Timestamp> {
            let spec = self.spec.lock().expect("lease lock");
            spec.as_ref()?.get("renewTime")?.as_str()?.parse().ok()
        }

        /// Another replica writes itself into the Lease.
        fn held_by(&self, holder: Option<&str>, seconds: u32) {
            let mut spec = Map::new();
            if let Some(holder) = holder {
                let now = MicroTime(Timestamp::now());
                spec.insert("holderIdentity".into(), json!(holder));
                spec.insert("acquireTime".into(), json!(now));
                spec.insert("renewTime".into(), json!(now));
                spec.insert("leaseDurationSeconds".into(), json!(seconds));
            }
            *self.spec.lock().expect("lease lock") = Some(spec);
        }
    }

    /// Short timings so the tests run in seconds: a 3 s Lease renewed every second.
    fn fast(identity: &str) -> LeaderElection {
        LeaderElection {
            lease_duration: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            ..LeaderElection::new(identity)
        }
    }

    /// Counts as running from its first poll until it is dropped or `stop` fires.
    fn controller(
        running: Arc<AtomicBool>,
        stop: Option<oneshot::Receiver<()>>,
    ) -> impl Future<Output = ()> {
        struct Running(Arc<AtomicBool>);
        impl Drop for Running {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        async move {
            running.store(true, Ordering::SeqCst);
            let _running = Running(running);
            match stop {
                Some(stop) => {
                    let _ = stop.await;
                }
                None => std::future::pending().await,
            }
        }
    }

    type Elected = tokio::task::JoinHandle<Result<(), LeaderError>>;

    fn elect(
        server: &LeaseServer,
        leadership: &Arc<Leadership>,
        running: &Arc<AtomicBool>,
        stop: Option<oneshot::Receiver<()>>,
        shutdown: oneshot::Receiver<()>,
    ) -> Elected {
        let (client, leadership, running) = (server.client(), leadership.clone(), running.clone());
        tokio::spawn(async move {
            let election = fast(ME);
            leadership
                .run_when_leader(
                    client,
                    Some(&election),
                    move || async move {
                        controller(running, stop).await;
                    },
                    async move {
                        let _ = shutdown.await;
                    },
                )
                .await
        })
    }

    async fn until(what: &str, within: Duration, condition: impl Fn() -> bool) {
        let waited = tokio::time::timeout(within, async {
            while !condition() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "not within {within:?}: {what}");
    }

    async fn outcome(elected: Elected, within: Duration) -> Result<(), LeaderError> {
        tokio::time::timeout(within, elected)
            .await
            .expect("run_when_leader did not return in time")
            .expect("run_when_leader panicked")
    }

    #[tokio::test]
    async fn a_free_lease_is_taken_and_the_controller_stops_when_another_replica_holds_it() {
        let server = LeaseServer::default();
        let (leadership, running) = (Arc::new(Leadership::new()), Arc::default());
        let (_shutdown, shutdown) = oneshot::channel();
        let elected = elect(&server, &leadership, &running, None, shutdown);
        let watch = leadership.subscribe();
        until("leading", Duration::from_secs(5), || *watch.borrow()).await;
        assert!(running.load(Ordering::SeqCst));
        assert_eq!(server.holder().as_deref(), Some(ME));

        server.held_by(Some(OTHER), 3);
        let result = outcome(elected, Duration::from_secs(3)).await;
        assert!(
            matches!(
                result,
                Err(LeaderError::Lost {
                    reason: LostReason::TakenOver,
                    ..
                })
            ),
            "{result:?}"
        );
        assert!(!running.load(Ordering::SeqCst), "controller still running");
        assert!(!leadership.is_leader());
    }

    #[tokio::test]
    async fn a_leader_cut_off_from_the_api_server_stops_before_a_standby_could_take_over() {
        let server = LeaseServer::default();
        let (leadership, running) = (Arc::new(Leadership::new()), Arc::default());
        let (_shutdown, shutdown) = oneshot::channel();
        let elected = elect(&server, &leadership, &running, None, shutdown);
        let watch = leadership.subscribe();
        until("leading", Duration::from_secs(5), || *watch.borrow()).await;

        server.down.store(true, Ordering::SeqCst);
        let renewed = server.renewed().expect("renewed");
        let result = outcome(elected, Duration::from_secs(4)).await;
        let stopped = Timestamp::now();
        assert!(
            matches!(
                result,
                Err(LeaderError::Lost {
                    reason: LostReason::NotRenewed,
                    ..
                })
            ),
            "{result:?}"
        );
        assert!(!running.load(Ordering::SeqCst));
        let expires = renewed
            .checked_add(Duration::from_secs(3))
            .expect("timestamp");
        assert!(
            stopped < expires,
            "stopped at {stopped}, the Lease ran out at {expires}"
        );
    }

    #[tokio::test]
    async fn a_standby_never_runs_the_controller_while_another_replica_holds_the_lease() {
        let server = LeaseServer::default();
        server.held_by(Some(OTHER), 3600);
        let (leadership, running) = (Arc::new(Leadership::new()), Arc::default());
        let (stop_shutdown, shutdown) = oneshot::channel();
        let elected = elect(&server, &leadership, &running, None, shutdown);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!running.load(Ordering::SeqCst));
        assert!(!leadership.is_leader());

        let _ = stop_shutdown.send(());
        assert!(outcome(elected, Duration::from_secs(2)).await.is_ok());
        assert_eq!(server.holder().as_deref(), Some(OTHER));
    }

    #[tokio::test]
    async fn a_standby_takes_a_released_lease_without_waiting_for_it_to_expire() {
        let server = LeaseServer::default();
        server.held_by(Some(OTHER), 3600);
        let (leadership, running) = (Arc::new(Leadership::new()), Arc::default());
        let (_shutdown, shutdown) = oneshot::channel();
        let _elected = elect(&server, &leadership, &running, None, shutdown);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert!(!leadership.is_leader());

        server.held_by(None, 0);
        let watch = leadership.subscribe();
        until(
            "taking over the released Lease",
            Duration::from_secs(3),
            || *watch.borrow(),
        )
        .await;
        assert_eq!(server.holder().as_deref(), Some(ME));
    }

    #[tokio::test]
    async fn on_shutdown_the_lease_is_held_until_the_controller_stops_then_released() {
        let server = LeaseServer::default();
        let (leadership, running) = (Arc::new(Leadership::new()), Arc::default());
        let (stop_controller, stop) = oneshot::channel();
        let (stop_shutdown, shutdown) = oneshot::channel();
        let mut elected = elect(&server, &leadership, &running, Some(stop), shutdown);
        let watch = leadership.subscribe();
        until("leading", Duration::from_secs(5), || *watch.borrow()).await;

        let _ = stop_shutdown.send(());
        let early = tokio::time::timeout(Duration::from_millis(1_500), &mut elected).await;
        assert!(early.is_err(), "returned before the controller stopped");
        assert!(leadership.is_leader());
        assert_eq!(server.holder().as_deref(), Some(ME));

        let _ = stop_controller.send(());
        assert!(outcome(elected, Duration::from_secs(3)).await.is_ok());
        assert!(!running.load(Ordering::SeqCst));
        assert!(!leadership.is_leader());
        assert_eq!(server.holder(), None, "Lease not released");
    }

    #[tokio::test]
    async fn without_election_the_controller_runs_at_once_as_the_leader() {
        let leadership = Leadership::new();
        let watch = leadership.subscribe();
        let client = LeaseServer::default().client();
        let result = leadership
            .run_when_leader(
                client,
                None,
                || async { assert!(*watch.borrow()) },
                std::future::pending(),
            )
            .await;
        assert!(result.is_ok());
        assert!(!leadership.is_leader());
    }
}
