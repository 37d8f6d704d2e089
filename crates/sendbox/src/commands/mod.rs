//! One module per subcommand; each command is a struct with `run(self)`.

pub mod accounts;
pub mod plugin;
