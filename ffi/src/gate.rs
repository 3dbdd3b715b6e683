//! A gate threads wait at until it opens, to go on or to go home: the striped reader's
//! threads start together behind one, as the bench's baseline threads do.

use std::sync::{Condvar, Mutex};

/// Holds threads until [`open`](Gate::open)ed; then every waiter, and every later one, gets
/// the word it was opened with.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<Option<bool>>,
    changed: Condvar,
}

impl Gate {
    /// Waits until the gate opens; whether to go on.
    pub fn wait(&self) -> bool {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = self
            .changed
            .wait_while(state, |state| state.is_none())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.unwrap_or(false)
    }

    /// Opens the gate: `go` tells the waiters to go on (true) or to go home (false).
    pub fn open(&self, go: bool) {
        *self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(go);
        self.changed.notify_all();
    }
}
