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
    /// Print a user's history: every published version with its parent, batches,
    /// verdict, held-out and live accuracy, standing and when it was live; the
    /// rollbacks and who or what caused them; the newest runs. The same as
    /// `GET /v1/users/{user}/history` (`--json` prints exactly that).
    History {
        #[command(flatten)]
        args: Args,
        #[arg(long)]
        user: String,
        /// Print the JSON the API answers instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Erase everything of a user (samples, batches, runs, versions, model files,
    /// tokens, counters, the user's events in the embedded log) and print the receipt
    /// (JSON). Resumes an erasure that was interrupted; erasing an erased user prints
    /// its receipt again. The same as `DELETE /v1/users/{user}` (docs/api.md).
    Forget {
        #[command(flatten)]
        args: Args,
        #[arg(long)]
        user: String,
        /// Records deleted per transaction.
        #[arg(long, default_value_t = swimlane_state::forget::CHUNK)]
        chunk: usize,
        /// Tests: after this many committed steps, print `paused` and wait to be
        /// killed (how the crash test interrupts an erasure at a known point).
        #[arg(long, hide = true)]
        pause_after: Option<u64>,
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
        /// The user was erased (`swimlane admin forget`): let it exist again, starting
        /// from nothing. Without it, a token for an erased user is refused.
        #[arg(long)]
        recreate: bool,
    },
    /// Revoke a token, read from standard input (so it never appears in a process
    /// listing or shell history).
    Revoke {
        #[command(flatten)]
        args: Args,
    },
}

/// `swimlane admin history` as text.
fn history_text(h: &swimlane_state::history::History) -> String {
    use std::fmt::Write;
    use swimlane_core::records::Standing;
    let model = |v: Option<u64>| v.map_or("base".to_string(), |v| format!("v{v}"));
    let acc = |a: Option<f64>| a.map_or("-".to_string(), |a| format!("{a:.3}"));
    let when = utc;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "user {}: head {}; {} versions, {} rollbacks, {} runs",
        h.user,
        model(h.head),
        h.versions.len(),
        h.rollbacks.len(),
        h.runs_total
    );
    let _ = writeln!(
        o,
        "base model: live {} on {} windows",
        acc(h.base_live.accuracy),
        h.base_live.windows
    );
    for v in &h.versions {
        let live: Vec<String> = v
            .live_periods
            .iter()
            .map(|p| {
                format!(
                    "{} .. {}",
                    when(p.from_ms),
                    p.until_ms.map_or("now".to_string(), when)
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "v{} (parent {}), published {}: {}; held-out {:.3} (parent {:.3}), live {} on {} windows; batches {}",
            v.version,
            model(v.parent_version),
            when(v.published_at_ms),
            v.standing.name(),
            v.heldout_accuracy,
            v.parent_heldout_accuracy,
            acc(v.live.accuracy),
            v.live.windows,
            v.batches.join(" ")
        );
        if let Some(r) = &v.verdict_reason {
            let _ = writeln!(o, "    accepted: {r}");
        }
        match &v.standing {
            Standing::Promoted { reason, .. } => {
                let _ = writeln!(o, "    promoted: {reason}");
            }
            Standing::RolledBack {
                reason,
                by,
                to,
                at_ms,
            } => {
                let _ = writeln!(
                    o,
                    "    rolled back to {} at {} by {by}: {reason}",
                    model(*to),
                    when(*at_ms)
                );
            }
            Standing::Superseded { by_version, .. } => {
                let _ = writeln!(o, "    superseded by v{by_version} while on probation");
            }
            Standing::Probation => {
                let _ = writeln!(
                    o,
                    "    on probation: {} fresh windows so far",
                    v.probation.windows
                );
            }
        }
        if !live.is_empty() {
            let _ = writeln!(o, "    live: {}", live.join(", "));
        }
    }
    for r in &h.runs {
        let _ = writeln!(
            o,
            "run {} from {} on {} ({} windows), {}: {}{}",
            r.run_id,
            model(r.parent_version),
            r.batches.join(" "),
            r.train_samples,
            when(r.created_at_ms),
            r.outcome,
            r.reason
                .as_ref()
                .map_or(String::new(), |why| format!(" ({why})"))
        );
    }
    o
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM:SSZ` (UTC; the civil-from-days algorithm
/// of Howard Hinnant's date library).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
            command:
                TokenCommand::Create {
                    args,
                    user,
                    recreate,
                },
        } => {
            let config = Config::load(&args, None)?;
            let user = UserId::new(user)?;
            let db = swimlane_runtime::open_store(&config)?;
            let repo = Repo::new(Keys::new(&config.deployment));
            let token = new_token();
            let now = now_ms();
            let erased = db.transact(|tx| {
                let forgotten = swimlane_state::forget::is_forgotten(&repo, tx, user.as_str())?;
                if forgotten && !recreate {
                    return Ok(true);
                }
                if forgotten {
                    swimlane_state::forget::recreate(&repo, tx, user.as_str())?;
                }
                repo.put_token(tx, &user, &token, now)?;
                Ok(false)
            })?;
            anyhow::ensure!(
                !erased,
                "user {user} was erased on request; pass --recreate to let it exist again, from nothing"
            );
            println!("{token}");
            Ok(())
        }
        AdminCommand::Forget {
            args,
            user,
            chunk,
            pause_after,
        } => {
            let config = Config::load(&args, None)?;
            let user = UserId::new(user)?;
            let db = swimlane_runtime::open_store(&config)?;
            let repo = Repo::new(Keys::new(&config.deployment));
            swimlane_state::forget::begin(&repo, &db, &user, "operator", now_ms())?;
            let mut steps = 0u64;
            let receipt =
                swimlane_state::forget::erase(&repo, &db, &user, &now_ms, chunk, &mut |_| {
                    steps += 1;
                    if pause_after == Some(steps) {
                        println!("paused after {steps} steps");
                        loop {
                            std::thread::park();
                        }
                    }
                })?;
            println!("{}", serde_json::to_string_pretty(&receipt)?);
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
        AdminCommand::History { args, user, json } => {
            let config = Config::load(&args, None)?;
            let user = UserId::new(user)?;
            let db = swimlane_runtime::open_store(&config)?;
            let repo = Repo::new(Keys::new(&config.deployment));
            let h =
                db.transact(|tx| swimlane_state::history::user_history(&repo, tx, user.as_str()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                print!("{}", history_text(&h));
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

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_the_epoch_and_a_leap_day() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00Z");
        // 2024-02-29 12:34:56 UTC.
        assert_eq!(super::utc(1_709_210_096_000), "2024-02-29 12:34:56Z");
        assert_eq!(super::utc(1_796_193_938_475), "2026-12-02 06:45:38Z");
    }
}
