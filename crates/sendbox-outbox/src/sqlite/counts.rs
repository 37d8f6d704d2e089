//! The count of messages in each state (`message_counts`), kept by the
//! writes that queue and move messages: each collects its moves in [`Moves`] and
//! applies them once, in its own transaction — one UPDATE per state whose
//! count changed, instead of a trigger's two on every row moved (which
//! also made every state change a statement with a journal of its own).

use rusqlite::{Connection, params};

use crate::State;

const STATES: [State; 5] = [
    State::Queued,
    State::Sending,
    State::Sent,
    State::Retry,
    State::Dead,
];

/// Moves between states not yet written to `message_counts`.
#[derive(Debug, Default)]
pub(super) struct Moves([i64; STATES.len()]);

impl Moves {
    /// One message moved from `from` to `to` (nothing when they are equal).
    pub(super) fn moved(&mut self, from: State, to: State) {
        self.moved_n(from, to, 1);
    }

    /// `n` messages moved from `from` to `to`.
    pub(super) fn moved_n(&mut self, from: State, to: State, n: i64) {
        if from != to {
            self.0[from as usize] -= n;
            self.0[to as usize] += n;
        }
    }

    /// `n` messages stored in state `to`.
    pub(super) fn added(&mut self, to: State, n: i64) {
        self.0[to as usize] += n;
    }

    /// Writes the moves collected, and forgets them.
    pub(super) fn apply(&mut self, c: &Connection) -> rusqlite::Result<()> {
        for state in STATES {
            let delta = std::mem::take(&mut self.0[state as usize]);
            if delta != 0 {
                c.prepare_cached("UPDATE message_counts SET n = n + ?1 WHERE state = ?2")?
                    .execute(params![delta, state.as_str()])?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_index_their_own_slot() {
        for (i, s) in STATES.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
        let mut m = Moves::default();
        m.moved(State::Queued, State::Sending);
        m.moved(State::Sending, State::Sent);
        m.moved(State::Queued, State::Queued);
        m.moved_n(State::Retry, State::Dead, 3);
        m.added(State::Queued, 2);
        assert_eq!(m.0, [1, 0, 1, -3, 3]);
    }
}
