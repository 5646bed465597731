//! Test support for the hosts runtime: the host daemon (what
//! `keelson-agent host` runs), `keelson-release-hostd LISTEN STATE_DIR
//! TOKEN_FILE NAME INSTANCE_ADDRESS`, and with `app PORT` a tiny HTTP app
//! whose checkurl passes as soon as it listens (on `KEELSON_BIND_ADDRESS`).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use keelson_agent_lifecycle::host;
use keelson_agent_lifecycle::output::Output;

fn app(port: &str) -> ExitCode {
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("app: bad port {port:?}");
        return ExitCode::from(2);
    };
    let address = std::env::var("KEELSON_BIND_ADDRESS").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match TcpListener::bind((address.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("app: cannot listen on {address}:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if let Some(code) = host::run_internal_from_args(std::env::args_os()) {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, port] = args.as_slice()
        && mode == "app"
    {
        return app(port);
    }
    let [listen, state_dir, token_file, name, address] = args.as_slice() else {
        eprintln!(
            "usage: keelson-release-hostd LISTEN STATE_DIR TOKEN_FILE NAME INSTANCE_ADDRESS | app PORT"
        );
        return ExitCode::from(2);
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("keelson-release-hostd: cannot find myself: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = host::DaemonConfig {
        listen: listen.clone(),
        state_dir: PathBuf::from(state_dir),
        token_file: PathBuf::from(token_file),
        name: name.clone(),
        instance_address: address.clone(),
        artifact_roots: Vec::new(),
        allowed_urls: Vec::new(),
        exe,
    };
    let stop = match keelson_agent_lifecycle::stop_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keelson-release-hostd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match host::run(config, Output::stdout("host"), stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson-release-hostd: {e}");
            ExitCode::FAILURE
        }
    }
}
