//! The daemon as a library the commands call: one process's life
//! (`run`: [`Daemon::run`]), what runs and how a config
//! change applies to it (`supervisor`), what its parts share (`registry`),
//! how an event becomes a committed outcome (`dispatch`), the SMTP
//! listeners (`submissions`), the delivery
//! workers (`workers`), signals, the watched config files
//! (`file_changes`), retention (`prune`), and what every command needs
//! first (`setup`). Commands parse their arguments, call into here and
//! print; none imports another command.

pub mod accounts;
pub mod dispatch;
pub mod file_changes;
pub mod prune;
pub mod registry;
pub mod run;
pub mod setup;
pub mod signals;
pub mod submissions;
pub mod supervisor;
pub mod workers;

pub use dispatch::{OutboxState, OutcomeBudget, dispatcher, wait_for};
pub use file_changes::FileChanges;
pub use registry::{Loaded, Registry, Shared, Wakers};
pub use run::{Daemon, Mode, Ready, Shutdown, Stopped};
pub use supervisor::{Applied, Supervisor};
