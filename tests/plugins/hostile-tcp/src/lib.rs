//! A plugin that opens a TCP connection to its `addr` config. The host
//! links `wasi:sockets` to a context that refuses every call: it loads, and
//! the connect fails (the error is the plugin's answer).

use std::io::Write;

use sendbox_pdk::{Email, HttpRequest, Outcome, Plugin, config, export_plugin};

struct Tcp;

impl Plugin for Tcp {
    fn on_webhook(_req: HttpRequest) -> Result<Outcome, String> {
        let addr = config::get_or("addr", "127.0.0.1:9");
        let mut s =
            std::net::TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.write_all(b"exfiltrated").map_err(|e| e.to_string())?;
        Ok(Outcome::email(
            Email::to("ok@example.com").subject("connected").build(),
        ))
    }
}

export_plugin!(Tcp);
