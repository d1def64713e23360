//! Alerts: things an operator must hear about. Every alert goes to the log;
//! with `[alerts] webhook_url` it is also POSTed as JSON, retried with
//! backoff by a background task, so raising one never blocks a send.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::clock::Timestamp;

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    AccountBanned,
    AccountUnauthorized,
    AccountSpamLimited,
    AudienceRefused,
    CampaignPaused,
    DiskFull,
    DialogError,
    EngineError,
    Handoff,
}

/// One alert, as the webhook receives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    /// Unix seconds.
    pub at: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialog: Option<u64>,
    /// One sentence for a human.
    pub message: String,
}

impl Alert {
    pub fn new(kind: AlertKind, at: Timestamp, message: impl Into<String>) -> Alert {
        Alert {
            kind,
            at: at.as_secs_f64(),
            account: None,
            campaign: None,
            dialog: None,
            message: message.into(),
        }
    }

    pub fn account(mut self, name: &str) -> Alert {
        self.account = Some(name.to_string());
        self
    }

    pub fn campaign(mut self, name: &str) -> Alert {
        self.campaign = Some(name.to_string());
        self
    }

    pub fn dialog(mut self, id: u64) -> Alert {
        self.dialog = Some(id);
        self
    }
}

/// How many undelivered webhook alerts wait before new ones are dropped
/// (and logged as dropped).
const WEBHOOK_QUEUE: usize = 1024;
/// Webhook attempts per alert.
const WEBHOOK_ATTEMPTS: u32 = 5;

/// Where alerts go. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Alerts {
    webhook: Option<mpsc::Sender<Alert>>,
    /// The newest [`RECENT`] alerts, newest last, for the console.
    recent: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Alert>>>,
    /// Alerts raised by kind, for `/metrics`.
    counts: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

/// How many alerts the console shows.
const RECENT: usize = 200;

impl Alerts {
    /// Alerts to the log only.
    pub fn log_only() -> Alerts {
        Alerts {
            webhook: None,
            recent: Default::default(),
            counts: Default::default(),
        }
    }

    /// How many alerts of each kind were raised since the host started.
    pub fn counts(&self) -> Vec<(String, u64)> {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.iter().map(|(k, n)| (k.clone(), *n)).collect()
    }

    /// The newest alerts, newest first.
    pub fn recent(&self) -> Vec<Alert> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().rev().cloned().collect()
    }

    /// Alerts to the log and, if a URL is given, to a webhook. Must be
    /// called inside a tokio runtime when a URL is given.
    pub fn new(webhook_url: Option<&str>) -> Alerts {
        let Some(url) = webhook_url else {
            return Alerts::log_only();
        };
        let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
        tokio::spawn(deliver(url.to_string(), rx));
        Alerts {
            webhook: Some(tx),
            recent: Default::default(),
            counts: Default::default(),
        }
    }

    /// Raises an alert; never waits.
    pub fn raise(&self, alert: Alert) {
        tracing::warn!(
            alert = ?alert.kind,
            account = alert.account.as_deref(),
            campaign = alert.campaign.as_deref(),
            dialog = alert.dialog,
            "{}",
            alert.message
        );
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(alert.clone());
            let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            *counts.entry(format!("{:?}", alert.kind)).or_default() += 1;
        }
        if let Some(tx) = &self.webhook {
            if tx.try_send(alert).is_err() {
                tracing::error!(
                    "alert webhook queue is full; an alert was not delivered to the webhook"
                );
            }
        }
    }
}

/// Posts each alert, retrying failures with exponential backoff.
async fn deliver(url: String, mut rx: mpsc::Receiver<Alert>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("alert webhook disabled: cannot build an HTTP client: {e}");
            return;
        }
    };
    while let Some(alert) = rx.recv().await {
        let mut delay = Duration::from_millis(500);
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            match client.post(&url).json(&alert).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if attempt == WEBHOOK_ATTEMPTS => {
                    tracing::error!(
                        "alert webhook answered {} {WEBHOOK_ATTEMPTS} times; alert dropped",
                        r.status()
                    )
                }
                Err(e) if attempt == WEBHOOK_ATTEMPTS => {
                    tracing::error!("alert webhook unreachable after {WEBHOOK_ATTEMPTS} attempts ({e}); alert dropped")
                }
                _ => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A webhook that fails its first request and records the body of the
    /// second.
    #[tokio::test]
    async fn webhook_alerts_are_retried_until_delivered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for status in ["500 Internal Server Error", "200 OK"] {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                loop {
                    let n = sock.read(&mut buf[got..]).await.unwrap();
                    got += n;
                    let text = String::from_utf8_lossy(&buf[..got]).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            bodies.push(body.to_string());
                            break;
                        }
                    }
                    if n == 0 {
                        break;
                    }
                }
                let reply =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                sock.write_all(reply.as_bytes()).await.unwrap();
            }
            bodies
        });
        let alerts = Alerts::new(Some(&url));
        alerts.raise(
            Alert::new(
                AlertKind::AccountBanned,
                Timestamp(1_500),
                "account alice is banned",
            )
            .account("alice"),
        );
        let bodies = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bodies.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&bodies[1]).unwrap();
        assert_eq!(v["kind"], "account_banned");
        assert_eq!(v["account"], "alice");
        assert_eq!(v["at"], 1.5);
    }
}
