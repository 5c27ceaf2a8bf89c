//! Panics in supervised actors become restarts; panics anywhere else end the process.
//!
//! `actix::Supervisor` restarts an actor that stops, but a panic would unwind
//! through the actor's task and kill it for good, leaving its address dead.
//! So the `Dispatcher` and `Persistence` actors run their message handling
//! inside [`guarded`]: a panic there is caught, the actor stops itself, and
//! its supervisor restarts it with the same mailbox. A panic outside a
//! guarded section leaves the server in an unknown state; the process then
//! aborts (crash-only), and a restart recovers everything from the database.

use actix::Message;
use log::error;
use serde::Deserialize;
use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

thread_local! {
    /// How many guarded sections the current thread is inside.
    static GUARD_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// How an injected failure fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// The actor stops itself, as it does on a database error.
    #[default]
    Stop,
    /// The actor panics in the middle of its work.
    Panic,
}

/// Makes a supervised actor fail on purpose (failure drills and tests).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct InjectFailure(pub FailureMode);

/// Installs the process-wide panic hook: print the panic as usual, then abort
/// unless a guarded section will catch it.
pub fn install_panic_hook() {
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if GUARD_DEPTH.with(Cell::get) == 0 {
            error!("panic outside a supervised actor: aborting so that a restart recovers from the database");
            std::process::abort();
        }
    }));
}

/// Runs `section`; returns `Err` with the panic message if it panicked.
pub fn guarded<R>(section: impl FnOnce() -> R) -> Result<R, String> {
    GUARD_DEPTH.with(|depth| depth.set(depth.get() + 1));
    let outcome = panic::catch_unwind(AssertUnwindSafe(section));
    GUARD_DEPTH.with(|depth| depth.set(depth.get() - 1));
    outcome.map_err(|payload| panic_message(payload.as_ref()))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| message.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_sections_return_values_and_catch_panics() {
        assert_eq!(guarded(|| 7), Ok(7));
        assert_eq!(guarded(|| -> u8 { panic!("boom {}", 1) }), Err("boom 1".to_string()));
        assert_eq!(guarded(|| -> u8 { panic!("static") }), Err("static".to_string()));
        assert_eq!(GUARD_DEPTH.with(Cell::get), 0);
    }
}
