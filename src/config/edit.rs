//! Changes the host itself makes to config.toml, so that the file stays
//! the one source of truth: formatting and comments are kept (toml_edit),
//! and the file is replaced whole (written beside it, then renamed), never
//! left half-written.

use std::path::Path;

use super::CampaignStatus;

/// Sets `status` of the campaign named `campaign`.
pub fn set_campaign_status(
    path: &Path,
    campaign: &str,
    status: CampaignStatus,
) -> Result<(), String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{shown} is not valid TOML: {e}"))?;
    let table = doc
        .get_mut("campaigns")
        .and_then(|c| c.as_array_of_tables_mut())
        .and_then(|camps| {
            camps
                .iter_mut()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(campaign))
        })
        .ok_or_else(|| format!("{shown} declares no campaign named \"{campaign}\""))?;
    match table.get_mut("status").and_then(|i| i.as_value_mut()) {
        // The comment after the old value stays after the new one.
        Some(old) => {
            let decor = old.decor().clone();
            *old = status.label().into();
            *old.decor_mut() = decor;
        }
        None => table["status"] = toml_edit::value(status.label()),
    }
    replace(path, doc.to_string().as_bytes()).map_err(|e| format!("cannot write {shown}: {e}"))
}

/// Writes `bytes` to a file beside `path` with its permissions, then renames
/// it over `path`.
fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.colloquy-tmp"));
    std::fs::write(&tmp, bytes)?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions())?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_changes_and_everything_else_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let before = "# my campaigns\n[[campaigns]]\nname = \"a\"   # first\nengine = \"x\"\n\n[[campaigns]]\nname = \"b\"\nstatus = \"active\" # on\n";
        std::fs::write(&path, before).unwrap();
        set_campaign_status(&path, "b", CampaignStatus::Paused).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            after,
            before.replace("status = \"active\"", "status = \"paused\"")
        );
        set_campaign_status(&path, "a", CampaignStatus::Paused).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(
            after.contains("name = \"a\"   # first\nengine = \"x\"\nstatus = \"paused\"\n"),
            "{after}"
        );
        let e = set_campaign_status(&path, "c", CampaignStatus::Paused).unwrap_err();
        assert!(e.ends_with("declares no campaign named \"c\""), "{e}");
    }
}
