//! The annotations a person sets on a ChatRelease to steer it, and the labels the operator puts on
//! what it makes.

use std::collections::BTreeMap;

pub const ROLLBACK: &str = "chatrelease.io/rollback";
pub const PROMOTE: &str = "chatrelease.io/promote";
pub const PAUSE: &str = "chatrelease.io/pause";
pub const RETRY: &str = "chatrelease.io/retry";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_TRACK: &str = "chatrelease.io/track";
pub const LABEL_REVISION: &str = "chatrelease.io/revision";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "chatrelease-operator";

/// Whether `key` is one of the annotations that steer a ChatRelease.
pub fn is_command(key: &str) -> bool {
    Command::ALL.iter().any(|c| c.annotation() == key)
}

/// A request a person made through an annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Command {
    Rollback,
    Promote,
    Pause,
    Retry,
}

impl Command {
    pub const ALL: [Command; 4] = [
        Command::Rollback,
        Command::Promote,
        Command::Pause,
        Command::Retry,
    ];

    pub fn annotation(self) -> &'static str {
        match self {
            Command::Rollback => ROLLBACK,
            Command::Promote => PROMOTE,
            Command::Pause => PAUSE,
            Command::Retry => RETRY,
        }
    }

    /// Pause holds until a person removes it; the others are removed once acted on.
    pub fn is_one_shot(self) -> bool {
        self != Command::Pause
    }
}

/// The commands present on an object. Only the value `"true"` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commands {
    pub rollback: bool,
    pub promote: bool,
    pub pause: bool,
    pub retry: bool,
}

impl Commands {
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Self {
        let on = |key: &str| annotations.get(key).is_some_and(|v| v.trim() == "true");
        Self {
            rollback: on(ROLLBACK),
            promote: on(PROMOTE),
            pause: on(PAUSE),
            retry: on(RETRY),
        }
    }

    pub fn has(&self, command: Command) -> bool {
        match command {
            Command::Rollback => self.rollback,
            Command::Promote => self.promote,
            Command::Pause => self.pause,
            Command::Retry => self.retry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_true_counts() {
        let annotations = BTreeMap::from([
            (ROLLBACK.to_string(), "true".to_string()),
            (PROMOTE.to_string(), "false".to_string()),
            (PAUSE.to_string(), " true ".to_string()),
        ]);
        let c = Commands::from_annotations(&annotations);
        assert!(c.rollback && !c.promote && c.pause && !c.retry);
    }

    #[test]
    fn pause_is_the_only_lasting_command() {
        let lasting: Vec<_> = Command::ALL
            .into_iter()
            .filter(|c| !c.is_one_shot())
            .collect();
        assert_eq!(lasting, vec![Command::Pause]);
    }
}
