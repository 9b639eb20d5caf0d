//! The `modelcache` command line. It parses arguments and calls the library;
//! everything it does is in `modelcache::*`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use modelcache::crd::CachePolicy;
use modelcache::crd::cache_policy::CachePolicySpec;
use modelcache::crd::model_cache::RedisOverrides;
use modelcache::store::RedisTarget;
use modelcache::{controller, crd, validate};

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
    /// Run the controller: one Redis per ModelCache, configured as a cache,
    /// with its config and health kept true in status.
    Controller(ControllerArgs),
    /// Run the controller's config and health logic once against a Redis:
    /// print desired vs applied config, INFO facts and the conditions.
    CheckRedis(CheckRedisArgs),
    /// Delete every cache key of a model's versions except those kept, for
    /// users without the controller and for CI/CD hooks.
    ///
    /// Exit codes: 0 done (or nothing to do); 1 failed (Redis unreachable, a
    /// command refused); 2 usage error; 3 refused because it would sweep the
    /// registry's active version.
    Invalidate(InvalidateArgs),
    /// Print the version and the API version served.
    Version,
}

#[derive(clap::Args)]
struct InvalidateArgs {
    /// redis://host:port[/db] or rediss://…, without the password.
    #[arg(long, env = "MODELCACHE_REDIS_URL")]
    redis_url: String,
    /// Password (better from the environment than on the command line).
    #[arg(long, env = "MODELCACHE_REDIS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    #[arg(long, env = "MODELCACHE_MODEL")]
    model: String,
    /// Versions whose keys stay (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    keep: Vec<String>,
    /// Print what would be deleted, and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keys deleted per second at most.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    keys_per_second: u64,
    /// The URL is one node of a Redis Cluster: find, count and sweep keys on
    /// every primary.
    #[arg(long)]
    cluster: bool,
    /// SCAN COUNT and keys per pipeline.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=100_000))]
    batch: u64,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Watch only this namespace (a namespaced Role suffices); all namespaces when unset.
    #[arg(long, env = "MODELCACHE_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "MODELCACHE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: std::net::SocketAddr,
    /// Seconds between checks of a healthy cache (config drift, INFO).
    #[arg(long, env = "MODELCACHE_HEALTH_INTERVAL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(5..=3600))]
    health_interval: u64,
    /// Take part in leader election through a Lease (run several replicas safely).
    #[arg(long, env = "MODELCACHE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the Lease: the controller's own.
    #[arg(long, env = "POD_NAMESPACE", default_value = "modelcache-system")]
    lease_namespace: String,
    #[arg(
        long,
        env = "MODELCACHE_LEASE_NAME",
        default_value = "modelcache-controller"
    )]
    lease_name: String,
    /// Identity in the Lease: the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reach every provisioned Redis at this URL instead of its Service, for a
    /// controller run outside the cluster through a port-forward.
    #[arg(long, env = "MODELCACHE_REDIS_URL_OVERRIDE")]
    redis_url_override: Option<String>,
}

#[derive(clap::Args)]
struct CheckRedisArgs {
    /// redis://host:port[/db] or rediss://…, without the password.
    #[arg(long, env = "MODELCACHE_REDIS_URL")]
    redis_url: String,
    /// Password (better from the environment than on the command line).
    #[arg(long, env = "MODELCACHE_REDIS_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// A CachePolicy manifest; the built-in defaults when unset.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Memory limit of the Redis container (overrides the policy's redis.memory).
    #[arg(long)]
    memory: Option<String>,
    /// CONFIG SET what differs; without it the check only compares.
    #[arg(long)]
    apply: bool,
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
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
        Command::Controller(args) => {
            let identity = args
                .identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("modelcache-{}", std::process::id()));
            let config = controller::ControllerConfig {
                namespace: args.namespace,
                http_addr: args.http_addr,
                health_interval: Duration::from_secs(args.health_interval),
                leader_election: args.leader_election,
                lease_namespace: args.lease_namespace,
                lease_name: args.lease_name,
                identity,
                lease_duration: Duration::from_secs(15),
                redis_url_override: args.redis_url_override,
            };
            runtime()?.block_on(controller::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckRedis(args) => {
            let policy = match &args.policy {
                None => CachePolicySpec::default(),
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("failed to read {}", path.display()))?;
                    let report = validate::Validator::new()?
                        .validate_yaml(&path.display().to_string(), &text)?;
                    if let Some(bad) = report.iter().find(|r| !r.violations.is_empty()) {
                        let list: Vec<String> =
                            bad.violations.iter().map(|v| v.to_string()).collect();
                        anyhow::bail!(
                            "{} is not a valid CachePolicy: {}",
                            path.display(),
                            list.join("; ")
                        );
                    }
                    let policy: CachePolicy = serde_saphyr::from_str(&text).with_context(|| {
                        format!("failed to read {} as a CachePolicy", path.display())
                    })?;
                    policy.spec
                }
            };
            let overrides = args.memory.map(|m| RedisOverrides {
                memory: Some(Quantity(m)),
                ..Default::default()
            });
            let target = RedisTarget {
                url: args.redis_url,
                username: None,
                password: args.password,
            };
            let report = runtime()?.block_on(controller::check::check_redis(
                &target,
                &policy,
                overrides.as_ref(),
                args.apply,
            ))?;
            print!("{}", controller::check::render(&report));
            let ready = report
                .status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            Ok(if ready {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
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
        Command::Invalidate(args) => {
            let target = RedisTarget {
                url: args.redis_url,
                username: None,
                password: args.password,
            };
            let keep: std::collections::BTreeSet<String> = args.keep.into_iter().collect();
            let pace = modelcache::sweep::Pace {
                keys_per_second: args.keys_per_second,
                batch: args.batch,
            };
            let result = runtime()?.block_on(async {
                if args.cluster {
                    return anyhow::Ok(
                        modelcache::sweep::invalidate_cluster(
                            &target,
                            &args.model,
                            &keep,
                            args.dry_run,
                            pace,
                        )
                        .await,
                    );
                }
                let mut conn = target.connect().await?;
                anyhow::Ok(
                    modelcache::sweep::invalidate(
                        &mut conn,
                        &args.model,
                        &keep,
                        args.dry_run,
                        pace,
                    )
                    .await,
                )
            })?;
            let outcomes = match result {
                Ok(o) => o,
                Err(e @ modelcache::sweep::InvalidateError::ActiveVersion { .. }) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(3));
                }
                Err(e) => return Err(e.into()),
            };
            if outcomes.is_empty() {
                println!("model {:?}: no keys outside the kept versions", args.model);
            }
            for o in &outcomes {
                match &o.report {
                    None => println!("would delete {} keys of version {:?}", o.keys, o.version),
                    Some(r) => println!(
                        "deleted {} keys of version {:?} in {:.2}s{}",
                        o.keys,
                        o.version,
                        r.elapsed.as_secs_f64(),
                        if r.resumed {
                            format!(" (resumed; {} deleted before)", r.deleted_before)
                        } else {
                            String::new()
                        }
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("{}", modelcache::version_line());
            Ok(ExitCode::SUCCESS)
        }
    }
}
