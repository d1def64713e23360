//! What an engine call gets and gives, as plain Rust values that cross
//! threads; the VM turns them into Lua tables and back.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// `ctx` of SPEC section 5.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ctx {
    pub dialog: DialogView,
    pub contact: ContactView,
    pub account: AccountView,
    pub campaign: CampaignView,
    /// Oldest first. Built into Lua only when the engine reads it, and
    /// shared, so the host can keep one per dialog and append to it.
    #[serde(skip)]
    pub history: Arc<Vec<HistoryEntry>>,
    /// The campaign's (or the dialog's variant's) prompt template, raw.
    pub prompt_template: Option<Arc<str>>,
    /// The dialog's variant, in a campaign with variants.
    pub variant: Option<String>,
    /// Unix seconds.
    pub now: f64,
    /// The engine's own state for this dialog.
    pub state: serde_json::Value,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DialogView {
    pub id: u64,
    pub status: String,
    pub started_at: f64,
    pub follow_ups_sent: u32,
    pub last_inbound_at: Option<f64>,
    pub last_outbound_at: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContactView {
    pub id: u64,
    pub username: Option<String>,
    pub phone: Option<String>,
    pub user_id: Option<i64>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountView {
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CampaignView {
    pub name: String,
    /// `[campaigns.params]`, as JSON.
    pub params: Arc<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// `"in"` or `"out"`.
    pub direction: std::borrow::Cow<'static, str>,
    pub text: String,
    pub at: f64,
}

/// Which engine function to call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Opening,
    /// An incoming message: its text and time (unix seconds).
    Response {
        text: String,
        at: f64,
    },
    FollowUp,
    IsDead,
}

impl Call {
    pub fn function(&self) -> &'static str {
        match self {
            Call::Opening => "get_opening",
            Call::Response { .. } => "get_response",
            Call::FollowUp => "get_follow_up",
            Call::IsDead => "is_dialog_dead",
        }
    }
}

/// What the engine asked for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Output {
    /// Messages to send, in order.
    pub messages: Vec<String>,
    /// End the dialog with this outcome.
    pub finish: Option<String>,
    /// Hand the dialog to a human.
    pub handoff: bool,
    /// `is_dialog_dead` answered true.
    pub dead: bool,
    /// `get_opening` returned nil: skip this contact.
    pub skip: bool,
}

/// An engine call's result: the output and the state to persist.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub output: Output,
    pub state: serde_json::Value,
}

impl From<crate::audience::ContactRow> for ContactView {
    fn from(row: crate::audience::ContactRow) -> ContactView {
        ContactView {
            id: 0,
            username: row.username,
            phone: row.phone,
            user_id: row.user_id,
            first_name: row.first_name,
            last_name: row.last_name,
            fields: row.fields,
        }
    }
}
