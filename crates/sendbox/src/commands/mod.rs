//! One module per subcommand; each command is a struct with `run(self)`.

pub mod accounts;
pub mod deliver;
pub mod hash_password;
pub mod outbox;
pub mod plugin;
pub mod plugin_build;
pub mod plugin_new;
pub mod plugin_test;
pub mod run;
