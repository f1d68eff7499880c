//! Every scenario in ../shared/scenarios runs through `simulate`'s code path and must match the
//! actions (and weights, where given) its `expect` lists.

use chatrelease::simulate;
use std::path::PathBuf;

fn scenario_dir() -> PathBuf {
    std::env::var_os("CHATRELEASE_SCENARIOS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/scenarios"))
}

#[test]
fn every_shared_scenario_gives_the_expected_actions() {
    let dir = scenario_dir();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());

    let mut mismatches = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
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
        for (outcome, want) in outcomes.iter().zip(expect) {
            let actions: Vec<&str> = want["actions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let weight_ok = want
                .get("weight")
                .and_then(|w| w.as_i64())
                .is_none_or(|w| w == outcome.weight as i64);
            if !actions.contains(&outcome.action) || !weight_ok {
                mismatches.push(format!(
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
    }
    assert!(mismatches.is_empty(), "\n{}", mismatches.join("\n"));
    eprintln!("{} scenarios matched their expectations", files.len());
}
