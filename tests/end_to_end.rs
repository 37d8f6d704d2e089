//! The end-to-end tests of the `sendbox` binary, one test binary for all
//! (one link instead of one per file, which matters on two cores). Each
//! module is one area; each test starts the real binary, and the real
//! peers where it needs them.

mod support;

mod accounts_cli;
mod cluster;
mod crash;
mod daemon;
mod daemon_peers;
mod drop_in;
mod hardening;
mod language_plugins;
mod listener;
mod outbox_cli;
mod plugin_build;
mod plugin_cli;
mod reload;
mod systemd_unit;
