//! blkdebug's rules and their state machine, as qemu's `block/blkdebug.c` keeps them:
//! `[inject-error]` and `[set-state]` rules (from a config file or `inject-error.N.*` /
//! `set-state.N.*` options) and qemu-io's breakpoints (`break EVENT TAG`: the request
//! raising the event is suspended until `resume TAG`; see [`super::breaks`]).
//!
//! An event ([`Engine::event`]) processes the rules on it whose `state` condition holds
//! (0: any state; the state starts at 1): the inject-error rules among them become the
//! active ones (replacing those active before), a set-state rule sets the state once all
//! are processed. A request ([`Engine::check`]) then fails with the first active
//! rule's errno whose iotype includes it and whose `sector` (if any) lies inside it; a
//! `once` rule is dropped after it fired.

use std::sync::{Condvar, Mutex, MutexGuard};

use anyhow::{Result as AnyResult, anyhow, bail};
use diskimg::blockio::DebugEvent;
use diskimg::{OptionList, Result};

/// Request kinds (qemu's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoType {
    Read = 0,
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    Flush = 4,
    BlockStatus = 5,
}

const IOTYPES: &[(&str, IoType)] = &[
    ("read", IoType::Read),
    ("write", IoType::Write),
    ("write-zeroes", IoType::WriteZeroes),
    ("discard", IoType::Discard),
    ("flush", IoType::Flush),
    ("block-status", IoType::BlockStatus),
];

/// What a rule does when its event happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Fail the following requests (`[inject-error]`).
    Inject {
        errno: i32,
        /// Byte offset (`sector` × 512) the request must contain, if any.
        offset: Option<u64>,
        once: bool,
        /// Bit `IoType as u32` set for the request kinds it fails.
        iotypes: u32,
    },
    /// Set the state (`[set-state]`).
    SetState(i64),
    /// Suspend the request raising the event, tagged so (qemu-io's `break`); the rule
    /// goes once it fired.
    Suspend(String),
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    pub(super) event: DebugEvent,
    /// The state the rule is for (0: any).
    pub(super) state: i64,
    pub(super) action: Action,
}

impl Rule {
    /// Builds a rule of `section` (`inject-error` or `set-state`) from its keys; `get`
    /// looks a key up.
    fn from_keys(
        section: &str,
        get: &dyn Fn(&str) -> Option<String>,
        keys: &[String],
    ) -> AnyResult<Rule> {
        let allowed: &[&str] = match section {
            "inject-error" => &[
                "event",
                "state",
                "errno",
                "sector",
                "once",
                "immediately",
                "iotype",
            ],
            _ => &["event", "state", "new_state"],
        };
        if let Some(k) = keys.iter().find(|k| !allowed.contains(&k.as_str())) {
            bail!("Invalid parameter '{k}'");
        }
        let name = get("event").ok_or_else(|| anyhow!("Missing event name for rule"))?;
        let event =
            DebugEvent::from_name(&name).ok_or_else(|| anyhow!("Invalid parameter '{name}'"))?;
        let num = |k: &str| -> AnyResult<Option<i64>> {
            get(k)
                .map(|v| {
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| anyhow!("Parameter '{k}' expects a number"))
                })
                .transpose()
        };
        let state = num("state")?.unwrap_or(0);
        if section == "set-state" {
            let new_state = num("new_state")?.unwrap_or(0);
            return Ok(Rule {
                event,
                state,
                action: Action::SetState(new_state),
            });
        }
        let flag = |k: &str| -> AnyResult<bool> {
            get(k).map_or(Ok(false), |v| crate::names::parse_bool(k, &v))
        };
        let errno = num("errno")?.unwrap_or(5);
        let errno =
            i32::try_from(errno).map_err(|_| anyhow!("Parameter 'errno' is out of range"))?;
        let offset = match num("sector")? {
            None | Some(-1) => None,
            Some(s) => Some(
                u64::try_from(s)
                    .ok()
                    .and_then(|s| s.checked_mul(512))
                    .ok_or_else(|| anyhow!("Invalid sector {s}"))?,
            ),
        };
        let iotypes = match get("iotype") {
            // qemu's default: every kind of request but block-status.
            None => IOTYPES
                .iter()
                .filter(|(_, t)| *t != IoType::BlockStatus)
                .fold(0, |m, (_, t)| m | 1 << *t as u32),
            Some(t) => {
                let ty = IOTYPES
                    .iter()
                    .find(|(n, _)| *n == t)
                    .ok_or_else(|| anyhow!("Invalid parameter '{t}'"))?;
                1 << ty.1 as u32
            }
        };
        // `immediately` only decides whether the failing request yields first.
        flag("immediately")?;
        Ok(Rule {
            event,
            state,
            action: Action::Inject {
                errno,
                offset,
                once: flag("once")?,
                iotypes,
            },
        })
    }
}

/// Parses a blkdebug config file (`[section]` lines, `key = "value"` lines).
pub(crate) fn parse_config(text: &str) -> AnyResult<Vec<Rule>> {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            sections.push((name.trim().to_string(), Vec::new()));
            continue;
        }
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| anyhow!("Could not parse blkdebug config file"))?;
        let v = v.trim().trim_matches('"').to_string();
        let Some((_, keys)) = sections.last_mut() else {
            bail!("Could not parse blkdebug config file");
        };
        keys.push((k.trim().to_string(), v));
    }
    let mut rules = Vec::new();
    for (name, keys) in sections {
        if !matches!(name.as_str(), "inject-error" | "set-state") {
            bail!("There is no option group '{name}'");
        }
        let get = |k: &str| {
            keys.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        let names: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        rules.push(Rule::from_keys(&name, &get, &names)?);
    }
    Ok(rules)
}

/// The `inject-error.N.*` and `set-state.N.*` rules of a blkdebug node's options (`o`
/// relative to it).
pub(crate) fn option_rules(o: &OptionList) -> AnyResult<Vec<Rule>> {
    let mut rules = Vec::new();
    for section in ["inject-error", "set-state"] {
        for i in 0.. {
            let p = format!("{section}.{i}.");
            let keys: Vec<String> = o
                .entries()
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(&p).map(str::to_string))
                .collect();
            if keys.is_empty() {
                break;
            }
            let get = |k: &str| o.get(&format!("{p}{k}")).map(str::to_string);
            rules.push(Rule::from_keys(section, &get, &keys)?);
        }
    }
    Ok(rules)
}

#[derive(Debug, Default)]
pub(super) struct State {
    /// The rules with their ids, oldest first.
    pub(super) rules: Vec<(u64, Rule)>,
    pub(super) next_id: u64,
    /// Ids of the active inject-error rules, in the order they are tried.
    active: Vec<u64>,
    /// The current state (qemu starts at 1).
    state: i64,
    /// Suspended requests (id, tag), the most recent first.
    pub(super) suspended: Vec<(u64, String)>,
    /// Messages for qemu-io's stdout (`blkdebug: Suspended request 'A'`), oldest first.
    pub(super) notes: Vec<String>,
}

impl State {
    pub(super) fn add(&mut self, rule: Rule) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.rules.push((id, rule));
        id
    }

    pub(super) fn remove(&mut self, id: u64) {
        self.rules.retain(|(i, _)| *i != id);
        self.active.retain(|i| *i != id);
    }
}

/// The rule state of one blkdebug node (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Engine {
    state: Mutex<State>,
    /// Signalled when a request is suspended or resumed.
    pub(super) changed: Condvar,
}

impl Engine {
    /// An engine with `rules`; rules on the `none` event are active from the start.
    pub(crate) fn new(rules: Vec<Rule>) -> Self {
        let mut s = State {
            state: 1,
            ..State::default()
        };
        for r in rules {
            let none = r.event == DebugEvent::None && matches!(r.action, Action::Inject { .. });
            let id = s.add(r);
            if none {
                s.active.push(id);
            }
        }
        Self {
            state: Mutex::new(s),
            changed: Condvar::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Processes the rules on `event` (qemu's `blkdebug_debug_event`); a breakpoint on
    /// it suspends the calling request until it is resumed.
    pub(crate) fn event(&self, event: DebugEvent) {
        let mut s = self.lock();
        let mut waits = Vec::new();
        let current = s.state;
        let mut new_state = current;
        let mut injected = false;
        // qemu keeps each event's rules newest first.
        let hits: Vec<u64> = (s.rules.iter().rev())
            .filter(|(_, r)| r.event == event && (r.state == 0 || r.state == current))
            .map(|(id, _)| *id)
            .collect();
        for id in hits {
            let Some(action) = s
                .rules
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, r)| r.action.clone())
            else {
                continue;
            };
            match action {
                Action::Inject { .. } => {
                    if !injected {
                        s.active.clear();
                        injected = true;
                    }
                    s.active.insert(0, id);
                }
                Action::SetState(n) => new_state = n,
                Action::Suspend(tag) => waits.push(s.suspend(id, tag)),
            }
        }
        s.state = new_state;
        if !waits.is_empty() {
            self.changed.notify_all();
            self.wait_resumed(s, &waits);
        }
    }

    /// Fails a request of `len` bytes at `offset` as the first matching active rule says
    /// (qemu's `rule_check`).
    pub(crate) fn check(&self, offset: u64, len: u64, ty: IoType) -> Result<()> {
        let mut s = self.lock();
        if s.active.is_empty() {
            return Ok(());
        }
        let hit = s.active.iter().find_map(|&id| {
            let (_, r) = s.rules.iter().find(|(i, _)| *i == id)?;
            match r.action {
                Action::Inject {
                    errno,
                    offset: at,
                    once,
                    iotypes,
                } if iotypes & (1 << ty as u32) != 0
                    && at.is_none_or(|o| len > 0 && o >= offset && o - offset < len) =>
                {
                    Some((id, errno, once))
                }
                _ => None,
            }
        });
        let Some((id, errno, once)) = hit else {
            return Ok(());
        };
        if errno == 0 {
            return Ok(());
        }
        if once {
            s.remove(id);
        }
        Err(std::io::Error::from_raw_os_error(errno).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_rules_fire_after_their_event() {
        let rules =
            parse_config("[inject-error]\nevent = \"l2_load\"\nsector = \"2048\"\nonce = \"on\"\n")
                .unwrap();
        let e = Engine::new(rules);
        e.check(1 << 20, 4096, IoType::Read).unwrap();
        e.event(DebugEvent::L2Load);
        e.check(2 << 20, 4096, IoType::Write).unwrap();
        let err = e.check(1 << 20, 4096, IoType::Write).unwrap_err();
        assert!(err.to_string().contains("Input/output error"), "{err}");
        // Once: gone for good, even after the event again.
        e.check(1 << 20, 4096, IoType::Write).unwrap();
        e.event(DebugEvent::L2Load);
        e.check(1 << 20, 4096, IoType::Write).unwrap();
    }

    #[test]
    fn set_state_gates_rules() {
        // iotest 066: the second write_aio fails, the first does not.
        let mut o = OptionList::new();
        o.set("set-state.0.event", "write_aio");
        o.set("set-state.0.new_state", "2");
        o.set("inject-error.0.event", "write_aio");
        o.set("inject-error.0.state", "2");
        let e = Engine::new(option_rules(&o).unwrap());
        e.event(DebugEvent::WriteAio);
        e.check(0, 512, IoType::Write).unwrap();
        e.event(DebugEvent::WriteAio);
        assert!(e.check(0, 512, IoType::Write).is_err());
        // Block status is not among the default iotypes.
        e.check(0, 512, IoType::BlockStatus).unwrap();
    }

    #[test]
    fn bad_rules_are_refused() {
        for text in [
            "[inject-error]\nevent = \"l1_grow.write_table\"\n",
            "[inject-error]\nevent = \"l1_update\"\nnew_state = \"1\"\n",
            "[suspend]\nevent = \"l1_update\"\n",
            "[inject-error]\nerrno = \"5\"\n",
        ] {
            assert!(parse_config(text).is_err(), "{text}");
        }
        let set_state = "[set-state]\nevent = \"read_aio\"\nnew_state = \"2\"\n";
        assert_eq!(parse_config(set_state).unwrap().len(), 1);
    }
}
