//! `swimlane admin ...`: set up a deployment and manage tokens, against the configured
//! store.
use clap::Subcommand;
use swimlane_core::keys::Keys;
use swimlane_core::UserId;
use swimlane_runtime::{Args, Config};
use swimlane_state::tokens::new_token;
use swimlane_state::{sha256_hex, Repo};

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Install the base model and the population guard set (once per deployment; a
    /// second run changes nothing).
    Init {
        #[command(flatten)]
        args: Args,
        /// Seed of the synthetic base model and guard set.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Use this base model file (safetensors from `swimlane model train-base`)
        /// instead of training one.
        #[arg(long, value_name = "FILE")]
        base_model: Option<std::path::PathBuf>,
    },
    /// Manage device tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Make a new admin token: prints the token (keep it secret) and the
    /// `admin_token_sha256` value to configure.
    AdminToken,
    /// Create the Kafka bus's topics with `partitions` partitions each, unless they
    /// exist (idempotent). Needs a build with `--features swimlane-runtime/kafka`;
    /// nothing to do on the embedded bus.
    CreateTopics {
        #[command(flatten)]
        args: Args,
        /// Replication factor of new topics.
        #[arg(long, default_value_t = 1)]
        replication: i32,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for a user and print it (only its hash is stored).
    Create {
        #[command(flatten)]
        args: Args,
        #[arg(long)]
        user: String,
    },
    /// Revoke a token, read from standard input (so it never appears in a process
    /// listing or shell history).
    Revoke {
        #[command(flatten)]
        args: Args,
    },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Init {
            args,
            seed,
            base_model,
        } => {
            let config = Config::load(&args, None)?;
            let db = swimlane_runtime::open_store(&config)?;
            let base = match base_model {
                Some(path) => Some(swimlane_model::MicroModel::from_bytes(&std::fs::read(
                    &path,
                )?)?),
                None => None,
            };
            let t0 = std::time::Instant::now();
            let done = swimlane_cli::init::install_for_spec(
                &db,
                &config.deployment,
                &config.model_spec()?,
                seed,
                base,
            )?;
            if done.already_present {
                println!(
                    "already initialised (base model {} bytes); nothing changed",
                    done.base_model_bytes
                );
            } else {
                println!(
                    "installed base model ({} bytes) and guard set ({} windows) in {:.1}s",
                    done.base_model_bytes,
                    done.guard_samples,
                    t0.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        AdminCommand::Token {
            command: TokenCommand::Create { args, user },
        } => {
            let config = Config::load(&args, None)?;
            let user = UserId::new(user)?;
            let db = swimlane_runtime::open_store(&config)?;
            let repo = Repo::new(Keys::new(&config.deployment));
            let token = new_token();
            let now = now_ms();
            db.transact(|tx| repo.put_token(tx, &user, &token, now))?;
            println!("{token}");
            Ok(())
        }
        AdminCommand::Token {
            command: TokenCommand::Revoke { args },
        } => {
            let config = Config::load(&args, None)?;
            let mut token = String::new();
            std::io::stdin().read_line(&mut token)?;
            let token = token.trim().to_string();
            let db = swimlane_runtime::open_store(&config)?;
            let repo = Repo::new(Keys::new(&config.deployment));
            if db.transact(|tx| repo.revoke_token(tx, &token))? {
                println!("revoked");
                Ok(())
            } else {
                anyhow::bail!("no such token")
            }
        }
        AdminCommand::CreateTopics { args, replication } => {
            let config = Config::load(&args, None)?;
            let topics = swimlane_runtime::wiring::create_topics(&config, replication)?;
            if topics.is_empty() {
                println!("embedded bus: no topics to create");
            } else {
                for t in topics {
                    println!("{t}: {} partitions", config.partitions);
                }
            }
            Ok(())
        }
        AdminCommand::AdminToken => {
            let token = new_token();
            println!("token: {token}");
            println!("admin_token_sha256 = \"{}\"", sha256_hex(token.as_bytes()));
            Ok(())
        }
    }
}
