//! The host daemon alone (what `keelson-agent host` runs), for the hosts
//! runtime's tests and benchmark: `keelson-hostd LISTEN STATE_DIR TOKEN_FILE
//! NAME INSTANCE_ADDRESS`.

use std::path::PathBuf;
use std::process::ExitCode;

use keelson_agent_lifecycle::host;
use keelson_agent_lifecycle::output::Output;

fn main() -> ExitCode {
    if let Some(code) = host::run_internal_from_args(std::env::args_os()) {
        return code;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, state_dir, token_file, name, address] = args.as_slice() else {
        eprintln!("usage: keelson-hostd LISTEN STATE_DIR TOKEN_FILE NAME INSTANCE_ADDRESS");
        return ExitCode::from(2);
    };
    let config = host::DaemonConfig {
        listen: listen.clone(),
        state_dir: PathBuf::from(state_dir),
        token_file: PathBuf::from(token_file),
        name: name.clone(),
        instance_address: address.clone(),
        artifact_roots: Vec::new(),
        allowed_urls: Vec::new(),
        exe: match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("keelson-hostd: cannot find myself: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let stop = match keelson_agent_lifecycle::stop_flag() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keelson-hostd: {e}");
            return ExitCode::FAILURE;
        }
    };
    match host::run(config, Output::stdout("host"), stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keelson-hostd: {e}");
            ExitCode::FAILURE
        }
    }
}
