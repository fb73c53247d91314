//! `bufshare`: command-line tool of the bufshare project. Subcommand `rtsp` serves bufshare
//! producers over RTSP (see `rtsp.rs`); `args.rs` parses the command line.

mod args;
mod rtsp;

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = match args::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bufshare: {e} (see 'bufshare --help')");
            return ExitCode::from(2);
        }
    };
    match command {
        args::Command::Help => {
            println!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        args::Command::Rtsp(a) => match rtsp::run(a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(rtsp::RuntimeError(msg)) => {
                eprintln!("bufshare rtsp: {msg}");
                ExitCode::from(1)
            }
        },
    }
}
