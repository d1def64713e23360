//! The engine library: an immutable snapshot of every engine, Lua module and
//! prompt template, read from disk and validated before it goes live.
//!
//! VMs load code only from a snapshot, never from disk, so a reload is a swap
//! of one `Arc`: calls in flight keep the snapshot (and VM) they started
//! with, and a half-saved or broken file never reaches a running engine.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;

/// One Lua source file.
#[derive(Debug, Clone)]
pub struct Source {
    /// The file as shown in errors: relative to the config's directory.
    pub shown: String,
    pub text: Arc<str>,
}

/// Where engines, modules and templates come from.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Shown paths are relative to this.
    pub base: PathBuf,
    pub engines: PathBuf,
    /// Searched for modules in order: scripts, engines, extra paths.
    pub module_dirs: Vec<PathBuf>,
    /// Prompt template files named by campaigns.
    pub templates: Vec<PathBuf>,
}

impl Dirs {
    pub fn from_config(config: &Config) -> Dirs {
        let mut module_dirs = vec![config.scripts_dir(), config.engines_dir()];
        module_dirs.extend(
            config
                .file
                .engines
                .extra_paths
                .iter()
                .map(|p| config.resolve(p)),
        );
        let templates = config
            .file
            .campaigns
            .iter()
            .flat_map(|c| {
                let variants = c.variants.iter().filter_map(|v| v.prompt_template.as_ref());
                c.prompt_template.iter().chain(variants)
            })
            .map(|t| config.resolve(t))
            .collect();
        Dirs {
            base: config.base_dir.clone(),
            engines: config.engines_dir(),
            module_dirs,
            templates,
        }
    }

    /// Engines from one directory (personas), with the config's modules.
    pub fn for_dir(config: &Config, engines: PathBuf) -> Dirs {
        Dirs {
            engines,
            templates: Vec::new(),
            ..Dirs::from_config(config)
        }
    }

    fn shown(&self, p: &Path) -> String {
        p.strip_prefix(&self.base)
            .unwrap_or(p)
            .display()
            .to_string()
    }

    /// Every directory and file whose change calls for a reload.
    pub fn watched(&self) -> Vec<PathBuf> {
        let mut out = vec![self.engines.clone()];
        out.extend(self.module_dirs.iter().cloned());
        out.extend(
            self.templates
                .iter()
                .filter_map(|t| t.parent().map(Path::to_path_buf)),
        );
        out.sort();
        out.dedup();
        out
    }
}

/// Everything the VMs load code from.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every swap; a VM built from an older one is replaced.
    pub generation: u64,
    /// Engine name (file stem in engines_dir) to source.
    pub engines: BTreeMap<String, Source>,
    /// Module name (`a.b` for `a/b.lua`) to source; the first directory wins.
    pub modules: HashMap<String, Source>,
    /// Prompt template path to its text.
    pub templates: HashMap<PathBuf, Arc<str>>,
    /// Engines whose file is there but does not load, with the reason
    /// (`engines/NAME.lua:3: unexpected symbol near 'end'`).
    pub broken: BTreeMap<String, String>,
}

impl Snapshot {
    /// A copy of this snapshot.
    pub fn duplicate(&self) -> Snapshot {
        Snapshot {
            generation: self.generation,
            engines: self.engines.clone(),
            modules: self.modules.clone(),
            templates: self.templates.clone(),
            broken: self.broken.clone(),
        }
    }

    /// Reads every file the library needs. Unreadable files are problems,
    /// returned beside the snapshot.
    pub fn read(dirs: &Dirs, generation: u64) -> (Snapshot, Vec<String>) {
        let mut problems = Vec::new();
        let mut snap = Snapshot {
            generation,
            ..Snapshot::default()
        };
        for path in lua_files(&dirs.engines, false) {
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    snap.engines.insert(
                        stem.to_string(),
                        Source {
                            shown: dirs.shown(&path),
                            text: text.into(),
                        },
                    );
                }
                Err(e) => problems.push(format!("{}: cannot read: {e}", dirs.shown(&path))),
            }
        }
        for dir in &dirs.module_dirs {
            for path in lua_files(dir, true) {
                let Some(name) = module_name(dir, &path) else {
                    continue;
                };
                if snap.modules.contains_key(&name) {
                    continue;
                }
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        snap.modules.insert(
                            name,
                            Source {
                                shown: dirs.shown(&path),
                                text: text.into(),
                            },
                        );
                    }
                    Err(e) => problems.push(format!("{}: cannot read: {e}", dirs.shown(&path))),
                }
            }
        }
        for t in &dirs.templates {
            match std::fs::read_to_string(t) {
                Ok(text) => match crate::engine::spin::check(&text) {
                    Ok(()) => {
                        snap.templates.insert(t.clone(), text.into());
                    }
                    Err(e) => problems.push(format!(
                        "{}:{}: spintax: {} (column {})",
                        dirs.shown(t),
                        e.line,
                        e.what,
                        e.column
                    )),
                },
                Err(e) => problems.push(format!("{}: cannot read: {e}", dirs.shown(t))),
            }
        }
        (snap, problems)
    }
}

/// `.lua` files of a directory, sorted; with `deep`, of its subdirectories too.
fn lua_files(dir: &Path, deep: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if deep {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "lua") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `dir/a/b.lua` → `a.b`, if every part is a plain name.
fn module_name(dir: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(dir).ok()?.with_extension("");
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    let name = parts?.join(".");
    crate::config::is_module_name(&name).then_some(name)
}
