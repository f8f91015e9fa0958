//! Waiting for `<prefix>/config`, without I/O. Operators start flanneld
//! before writing the config, so (as flannel does) an absent config is
//! asked for again every second, said once in the log; an unreachable etcd
//! is retried with backoff; a config that is there but invalid, or
//! credentials etcd refuses, end the wait with an error naming why.

use super::store::StoreError;
use crate::config::NetworkConfig;
use std::time::Duration;

/// How often an absent config is asked for again (flannel: every second).
pub const POLL: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Ask the store again after this long.
    AskAfter(Duration),
    /// The config is there and valid (with its text).
    Ready(NetworkConfig, String),
    /// Give up: the daemon exits with this error.
    Fatal(String),
}

#[derive(Debug)]
pub struct ConfigWait {
    said_absent: bool,
    said_unreachable: bool,
    backoff: Duration,
}

impl Default for ConfigWait {
    fn default() -> Self {
        ConfigWait {
            said_absent: false,
            said_unreachable: false,
            backoff: Duration::from_millis(100),
        }
    }
}

impl ConfigWait {
    /// Whether the absent config was reported (once).
    pub fn waited(&self) -> bool {
        self.said_absent
    }

    /// The store's answer to "get `<prefix>/config`".
    pub fn on_answer(&mut self, answer: Result<Option<String>, StoreError>) -> Next {
        match answer {
            Ok(Some(text)) => {
                if self.said_absent {
                    tracing::info!("the network config appeared");
                }
                match NetworkConfig::parse(&text) {
                    Ok(cfg) => Next::Ready(cfg, text),
                    Err(e) => Next::Fatal(format!("invalid network config in etcd: {e}")),
                }
            }
            Ok(None) => {
                if !self.said_absent {
                    tracing::warn!("no network config in etcd yet (<prefix>/config); retrying every second until it is written");
                    self.said_absent = true;
                }
                self.backoff = Duration::from_millis(100);
                Next::AskAfter(POLL)
            }
            Err(e) if e.is_permanent() => {
                Next::Fatal(format!("reading the network config: etcd refused us: {e}"))
            }
            Err(e) => {
                if !self.said_unreachable {
                    tracing::warn!("reading the network config failed, retrying: {e}");
                    self.said_unreachable = true;
                }
                let d = self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_CAP);
                Next::AskAfter(d)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::memory::{Memory, PREFIX};
    use std::time::Instant;

    #[test]
    fn a_config_written_late_is_waited_for_and_a_bad_one_named() {
        let mut m = Memory::default();
        let mut w = ConfigWait::default();
        // etcd away at first: backoff, 100 ms doubling.
        m.down = true;
        assert_eq!(
            w.on_answer(m.get_config()),
            Next::AskAfter(Duration::from_millis(100))
        );
        assert_eq!(
            w.on_answer(m.get_config()),
            Next::AskAfter(Duration::from_millis(200))
        );
        // Reachable, no config yet: every second, said once.
        m.down = false;
        for _ in 0..3 {
            assert_eq!(w.on_answer(m.get_config()), Next::AskAfter(POLL));
        }
        assert!(w.waited());
        // Written late: ready with it.
        let text = r#"{"Network":"10.7.0.0/16"}"#;
        m.put(
            &format!("{PREFIX}/config"),
            text.as_bytes(),
            None,
            Instant::now(),
        );
        match w.on_answer(m.get_config()) {
            Next::Ready(cfg, t) => {
                assert_eq!(cfg.network, "10.7.0.0/16".parse().unwrap());
                assert_eq!(t, text);
            }
            other => panic!("{other:?}"),
        }
        // A config that is there but invalid ends the wait, naming the field.
        m.put(
            &format!("{PREFIX}/config"),
            br#"{"Network":"10.7.0.0/16","SubnetLen":40}"#,
            None,
            Instant::now(),
        );
        match ConfigWait::default().on_answer(m.get_config()) {
            Next::Fatal(why) => assert!(why.contains("SubnetLen"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Refused credentials end it too.
        m.refuse = true;
        assert!(matches!(
            ConfigWait::default().on_answer(m.get_config()),
            Next::Fatal(why) if why.contains("refused")
        ));
    }
}
