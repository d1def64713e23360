//! `colloquy chat --campaign NAME`: the operator plays the contact on stdin,
//! the campaign's engine answers on stdout, opening first. No transport, no
//! store writes; engines reload on save as in the host.
//!
//! Lines starting with `/` are commands: `/followup` asks for a follow-up,
//! `/dead` asks whether the dialog is dead, `/quit` ends the chat.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

use super::{no_such_campaign, Failure};
use crate::audience;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::engine::ctx::{AccountView, CampaignView, ContactView, DialogView, HistoryEntry};
use crate::engine::{watch, Call, Ctx, EngineRuntime, Output};
use crate::host::optout::OptOut;
use crate::problem::{Problem, Problems};

/// Runs a chat until `/quit`, end of input, or the engine ends the dialog;
/// on `variant` (by name), or the campaign's first variant.
pub fn run(config_path: &Path, campaign: &str, variant: Option<&str>) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let Some(camp) = config.campaign(campaign).cloned() else {
        return Err(no_such_campaign(&config, campaign));
    };
    let variant = chosen_variant(&camp, variant)?;
    let runs = camp.runs_on_declared(variant.as_deref());
    if let Some(name) = &variant {
        eprintln!("[variant {name}: engine {}]", runs.engine);
    }
    let clock = Arc::new(SystemClock);
    let (engines, problems) = EngineRuntime::start(&config, clock.clone(), 1);
    if !engines.engines().contains(&runs.engine) {
        return Err(Failure::Input(Problems(
            problems.into_iter().map(|m| Problem::new("", m)).collect(),
        )));
    }
    let _watch = watch(&engines)
        .map_err(|e| Failure::Other(format!("cannot watch the engine files: {e}")))?;
    let mut ctx = trial_ctx(
        &camp,
        sample_contact(&config, &camp.audiences),
        clock.as_ref(),
    );
    ctx.variant = variant;
    let chat = Chat {
        rt: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::Other(e.to_string()))?,
        template_path: runs.prompt_template.as_ref().map(|t| config.resolve(t)),
        engine: runs.engine,
        engines,
        clock,
    };
    if !chat.say(&mut ctx, Call::Opening) {
        return Ok(());
    }
    let opt_out = OptOut::new(&config.file.compliance.opt_out_patterns);
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Failure::Other(format!("cannot read stdin: {e}")))?;
        let go_on = chat.hear(&mut ctx, line.trim(), &opt_out);
        let _ = std::io::stdout().flush();
        if !go_on {
            break;
        }
    }
    Ok(())
}

/// The variant named by `--variant`, or the campaign's first.
fn chosen_variant(
    camp: &crate::config::Campaign,
    variant: Option<&str>,
) -> Result<Option<String>, Failure> {
    match variant {
        Some(name) if camp.variant(name).is_none() => {
            let names: Vec<&str> = camp.variants.iter().map(|v| v.name.as_str()).collect();
            let has = if names.is_empty() {
                "it declares none".to_string()
            } else {
                format!("it has {}", names.join(", "))
            };
            Err(Failure::Input(Problems(vec![Problem::new(
                "--variant",
                format!("campaign {} has no variant \"{name}\"; {has}", camp.name),
            )])))
        }
        Some(name) => Ok(Some(name.to_string())),
        None => Ok(camp.variants.first().map(|v| v.name.clone())),
    }
}

/// A chat's engine and what a call needs besides the ctx.
struct Chat {
    rt: tokio::runtime::Runtime,
    engines: EngineRuntime,
    engine: String,
    template_path: Option<std::path::PathBuf>,
    clock: Arc<SystemClock>,
}

impl Chat {
    /// Asks the engine and prints its answer; false when the dialog is over.
    fn say(&self, ctx: &mut Ctx, call: Call) -> bool {
        ctx.now = self.clock.now().as_secs_f64();
        ctx.prompt_template = self
            .template_path
            .as_ref()
            .and_then(|p| self.engines.snapshot().templates.get(p).cloned());
        match self
            .rt
            .block_on(self.engines.call(&self.engine, call.clone(), ctx.clone()))
        {
            Ok(reply) => {
                ctx.state = reply.state;
                show(ctx, &call, &reply.output, self.clock.as_ref())
            }
            Err(e) => {
                eprintln!("{e}");
                true
            }
        }
    }

    /// A line the operator typed as the contact, or a command; false when
    /// the chat is over.
    fn hear(&self, ctx: &mut Ctx, text: &str, opt_out: &OptOut) -> bool {
        match text {
            "" => true,
            "/quit" => false,
            "/followup" => self.say(ctx, Call::FollowUp),
            "/dead" => self.say(ctx, Call::IsDead),
            t if t.starts_with('/') => {
                println!("[commands: /followup, /dead, /quit]");
                true
            }
            t if opt_out.matches(t) => {
                // As the host does: the engine is not asked.
                println!(
                    "[opted out: the host would end the dialog here and never write to this contact again]"
                );
                false
            }
            t => {
                let at = self.clock.now().as_secs_f64();
                Arc::make_mut(&mut ctx.history).push(HistoryEntry {
                    direction: "in".into(),
                    text: t.to_string(),
                    at,
                });
                ctx.dialog.last_inbound_at = Some(at);
                let text = t.to_string();
                self.say(ctx, Call::Response { text, at })
            }
        }
    }
}

/// Prints what the engine said; false when the dialog is over.
fn show(ctx: &mut Ctx, call: &Call, out: &Output, clock: &dyn Clock) -> bool {
    let at = clock.now().as_secs_f64();
    for m in &out.messages {
        println!("{m}");
        Arc::make_mut(&mut ctx.history).push(HistoryEntry {
            direction: "out".into(),
            text: m.clone(),
            at,
        });
        ctx.dialog.last_outbound_at = Some(at);
    }
    if *call == Call::FollowUp {
        if out.messages.is_empty() {
            println!("[no follow-up]");
        } else {
            ctx.dialog.follow_ups_sent += 1;
        }
    }
    if *call == Call::IsDead {
        println!("[dead: {}]", out.dead);
    }
    if out.skip {
        println!("[get_opening returned nil: the host would skip this contact]");
        return false;
    }
    if let Some(outcome) = &out.finish {
        println!("[finished: {outcome}]");
        return false;
    }
    if out.handoff {
        println!("[handed off to a human]");
        return false;
    }
    let _ = std::io::stdout().flush();
    true
}

/// The first contact of the campaign's audiences, so templates render with
/// real fields; a placeholder if there is none.
/// The ctx of a dialog that is only tried (chat, check): id 0, no history.
pub(crate) fn trial_ctx(
    camp: &crate::config::Campaign,
    contact: ContactView,
    clock: &dyn Clock,
) -> Ctx {
    let params = serde_json::to_value(&camp.params).unwrap_or_default();
    Ctx {
        dialog: DialogView {
            id: 0,
            status: "active".into(),
            started_at: clock.now().as_secs_f64(),
            ..DialogView::default()
        },
        contact,
        account: AccountView {
            name: camp.accounts.first().cloned().unwrap_or_default(),
        },
        campaign: CampaignView {
            name: camp.name.clone(),
            params: Arc::new(params),
        },
        state: serde_json::json!({}),
        now: clock.now().as_secs_f64(),
        ..Ctx::default()
    }
}

fn sample_contact(config: &Config, audiences: &[String]) -> ContactView {
    for name in audiences {
        let Some(a) = config.file.audiences.iter().find(|a| &a.name == name) else {
            continue;
        };
        if let Some(row) = audience::read(&config.resolve(&a.file))
            .rows
            .into_iter()
            .next()
        {
            return ContactView::from(row);
        }
    }
    ContactView {
        first_name: Some("You".into()),
        ..ContactView::default()
    }
}
