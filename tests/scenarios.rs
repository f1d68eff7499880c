//! The judge's specification as scenario files: every `tests/scenarios/*.json` runs through
//! `simulate`'s code path and must give the actions (and weights, where given) its `expect` lists.
//!
//! The project's own copies live in `tests/scenarios`. Scenarios shared from outside the
//! repository (`../shared/scenarios` beside a developer's checkout, or any folder named in
//! `CHATRELEASE_SCENARIOS`) run too when they exist, so a file added there is checked at once;
//! a clone with neither runs its own.

use chatrelease::simulate;
use std::path::{Path, PathBuf};

fn own_scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

/// Folders of scenarios from outside the repository that exist on this machine.
fn outside_scenarios() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("CHATRELEASE_SCENARIOS") {
        // Named on purpose: a missing folder is an error, not a silent skip.
        let dir = PathBuf::from(dir);
        assert!(
            dir.is_dir(),
            "CHATRELEASE_SCENARIOS={} is no folder",
            dir.display()
        );
        dirs.push(dir);
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/scenarios");
    if shared.is_dir() {
        dirs.push(shared);
    }
    dirs
}

fn scenario_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Each tick of `file` whose action or weight is not one its `expect` allows, as a line.
fn mismatches(file: &Path) -> Vec<String> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).expect("readable scenario");
    let scenario = simulate::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let outcomes = simulate::run(&scenario).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expect = scenario
        .expect
        .as_ref()
        .and_then(|e| e.as_array())
        .unwrap_or_else(|| panic!("{name}: no expect"));
    assert_eq!(
        expect.len(),
        outcomes.len(),
        "{name}: one expectation per tick"
    );
    let mut out = Vec::new();
    for (outcome, want) in outcomes.iter().zip(expect) {
        let actions: Vec<&str> = want["actions"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: an expect entry without actions"))
            .iter()
            .map(|a| a.as_str().unwrap_or_default())
            .collect();
        let weight_ok = want
            .get("weight")
            .and_then(|w| w.as_i64())
            .is_none_or(|w| w == outcome.weight as i64);
        if !actions.contains(&outcome.action) || !weight_ok {
            out.push(format!(
                "{name} tick {}: got {} at {}% ({}), want {:?} {}",
                outcome.tick,
                outcome.action,
                outcome.weight,
                outcome.reason,
                actions,
                want.get("weight")
                    .map(|w| format!("at {w}%"))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

#[test]
fn every_scenario_of_the_repository_gives_the_expected_actions() {
    let files = scenario_files(&own_scenarios());
    assert!(
        files.len() >= 9,
        "tests/scenarios lost its files: {files:?}"
    );
    let wrong: Vec<String> = files.iter().flat_map(|f| mismatches(f)).collect();
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    eprintln!("{} scenarios matched their expectations", files.len());
}

#[test]
fn every_scenario_shared_from_outside_gives_the_expected_actions() {
    let dirs = outside_scenarios();
    if dirs.is_empty() {
        eprintln!("no ../shared/scenarios and no CHATRELEASE_SCENARIOS: only the repository's ran");
        return;
    }
    let mut wrong = Vec::new();
    for dir in &dirs {
        let files = scenario_files(dir);
        assert!(!files.is_empty(), "no scenarios in {}", dir.display());
        wrong.extend(files.iter().flat_map(|f| mismatches(f)));
        eprintln!("{}: {} scenarios", dir.display(), files.len());
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
}

/// A scenario that exists outside under the same name as one of ours must be the same file, or
/// our copy is stale: the outside one is the newer word on what the judge should do.
#[test]
fn the_repositorys_copies_match_the_shared_scenarios_of_the_same_name() {
    for dir in outside_scenarios() {
        for theirs in scenario_files(&dir) {
            let ours = own_scenarios().join(theirs.file_name().expect("a file name"));
            if !ours.exists() {
                continue;
            }
            let parse = |p: &Path| -> serde_json::Value {
                serde_json::from_str(&std::fs::read_to_string(p).expect("readable"))
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            };
            assert_eq!(
                parse(&ours),
                parse(&theirs),
                "{} differs from {}: copy the shared one into tests/scenarios",
                ours.display(),
                theirs.display()
            );
        }
    }
}

/// The built-in check scenarios: a ChatRelease that names a check and writes no PromQL is rolled
/// back by that check alone. With the canary's values of the check set to stable's (all else
/// the same), nothing is rolled back.
#[test]
fn a_builtin_check_alone_rolls_back_a_ttft_regression_and_a_memory_leak() {
    for (file, check) in [
        ("ttft-regression-builtin-rollback.json", "ttft-p99"),
        ("memory-leak-rollback.json", "memory-growth"),
    ] {
        let text = std::fs::read_to_string(own_scenarios().join(file)).expect("readable");
        let scenario = simulate::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let metrics = &scenario.release.spec.analysis.metrics;
        assert!(
            metrics
                .iter()
                .all(|m| m.query.is_none() && m.check.is_some()),
            "{file}: no PromQL written"
        );
        let outcomes = simulate::run(&scenario).expect("runs");
        let rollback = outcomes
            .iter()
            .find(|o| o.action == "rollback")
            .unwrap_or_else(|| panic!("{file}: no rollback in {outcomes:?}"));
        assert!(
            rollback.reason.contains(check),
            "{file}: the rollback does not name {check}: {}",
            rollback.reason
        );

        let mut same = scenario.clone();
        for tick in &mut same.ticks {
            if let (Some(canary), Some(stable)) = (&mut tick.canary, &tick.stable) {
                canary.custom = stable.custom.clone();
            }
        }
        let outcomes = simulate::run(&same).expect("runs");
        assert!(
            outcomes.iter().all(|o| o.action != "rollback"),
            "{file}: rolled back with the canary's {check} at stable's: {outcomes:?}"
        );
    }
}
