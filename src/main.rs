//! The `modelcache` command line. It parses arguments and calls the library;
//! everything it does is in `modelcache::*`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use modelcache::{crd, validate};

/// Caches for ML serving on Kubernetes: a Redis per model configured as a
/// cache, version-scoped keys swept after rollouts, verified model fetch and
/// prefix-cache warm-up.
#[derive(Parser)]
#[command(name = "modelcache", version, about, long_about = None)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "MODELCACHE_LOG_JSON")]
    log_json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ModelCache and CachePolicy CRDs as one YAML stream.
    Crd {
        /// Write one file per CRD into this directory instead.
        #[arg(long, value_name = "DIR", conflicts_with = "check")]
        out_dir: Option<PathBuf>,
        /// Exit 1 when the files in this directory differ from the types.
        #[arg(long, value_name = "DIR")]
        check: Option<PathBuf>,
    },
    /// Validate ModelCache and CachePolicy manifests against the CRD schemas,
    /// CEL rules included. Exit 1 when any resource is invalid.
    Validate {
        /// YAML files, each with one or more documents; `-` reads standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the version and the API version served.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MODELCACHE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Crd {
            out_dir: Some(dir), ..
        } => {
            for path in crd::write_dir(&dir)? {
                eprintln!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Crd {
            check: Some(dir), ..
        } => {
            let drift = crd::check_dir(&dir)?;
            if drift.is_empty() {
                eprintln!("{}: CRDs match the types", dir.display());
                return Ok(ExitCode::SUCCESS);
            }
            for d in &drift {
                eprintln!("{}: {d}", dir.display());
            }
            eprintln!(
                "regenerate with `modelcache crd --out-dir {}` and commit the result",
                dir.display()
            );
            Ok(ExitCode::FAILURE)
        }
        Command::Crd { .. } => {
            print!("{}", crd::render_stream()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => {
            let validator = validate::Validator::new()?;
            let mut invalid = 0;
            for file in &files {
                let name = file.display().to_string();
                let yaml = if name == "-" {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("failed to read standard input")?;
                    s
                } else {
                    std::fs::read_to_string(file)
                        .with_context(|| format!("failed to read {name}"))?
                };
                for report in validator.validate_yaml(&name, &yaml)? {
                    if report.violations.is_empty() {
                        println!("valid    {name}#{} {}", report.index, report.resource);
                    } else {
                        invalid += 1;
                        println!("INVALID  {name}#{} {}", report.index, report.resource);
                        for v in &report.violations {
                            println!("  - {v}");
                        }
                    }
                }
            }
            Ok(if invalid == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("{invalid} invalid resource(s); fix the fields named above");
                ExitCode::FAILURE
            })
        }
        Command::Version => {
            println!("{}", modelcache::version_line());
            Ok(ExitCode::SUCCESS)
        }
    }
}
