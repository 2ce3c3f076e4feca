//! docs/ARCHITECTURE.md describes the code: it must name every workspace member (its folder and
//! its package), every server module, and every table of both storage engines. A new crate,
//! module or table that the page does not mention fails this test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The text of section `## heading` of docs/ARCHITECTURE.md, up to the next `## `.
fn section(heading: &str) -> String {
    let doc = read(&root().join("docs/ARCHITECTURE.md"));
    let start = doc
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("docs/ARCHITECTURE.md has no section {heading:?}"));
    let body = &doc[start + heading.len() + 5..];
    body[..body.find("\n## ").unwrap_or(body.len())].to_owned()
}

/// The quoted strings of `members = [...]` in the workspace Cargo.toml.
fn workspace_members() -> Vec<String> {
    let manifest = read(&root().join("Cargo.toml"));
    let start = manifest.find("members").expect("no members in Cargo.toml");
    let list = &manifest[start..];
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    let members: Vec<String> = list
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    assert!(members.len() >= 3, "members: {members:?}");
    members
}

/// `name = "..."` of a member's `[package]`.
fn package_name(member: &str) -> String {
    let manifest = read(&root().join(member).join("Cargo.toml"));
    manifest
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix("name")?.trim_start().strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("{member}/Cargo.toml has no name"))
}

/// Every word that follows `marker` in `text` (identifier characters only).
fn names_after(text: &str, marker: &str) -> Vec<String> {
    text.match_indices(marker)
        .map(|(at, _)| {
            text[at + marker.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

fn redb_tables() -> Vec<String> {
    let text = read(&root().join("server/src/storage/redb/tables.rs"));
    let names = names_after(&text, "TableDefinition::new(\"");
    assert!(names.len() >= 10, "redb tables: {names:?}");
    names
}

/// `CREATE TABLE [IF NOT EXISTS] name` in the PostgreSQL engine's migrations and code.
fn postgres_tables() -> Vec<String> {
    let mut files = vec![root().join("server/src/storage/postgres")];
    let mut names = Vec::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                files.push(entry.unwrap().path());
            }
            continue;
        }
        let text = read(&path).replace("IF NOT EXISTS ", "");
        names.extend(names_after(&text, "CREATE TABLE "));
    }
    assert!(names.len() >= 10, "PostgreSQL tables: {names:?}");
    names.sort();
    names.dedup();
    names
}

/// The modules `server/src/lib.rs` declares.
fn server_modules() -> Vec<String> {
    let text = read(&root().join("server/src/lib.rs"));
    let names: Vec<String> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix("pub ")
                .or_else(|| line.strip_prefix("pub(crate) "))
                .unwrap_or(line);
            let name = line.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.to_owned())
        })
        .collect();
    assert!(names.len() >= 10, "modules: {names:?}");
    names
}

fn assert_all_mentioned(
    heading: &str,
    what: &str,
    names: &[String],
    shown: impl Fn(&str) -> String,
) {
    let text = section(heading);
    let missing: Vec<&String> = names
        .iter()
        .filter(|name| !text.contains(&shown(name)))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md, section {heading:?}, does not mention these {what}: {missing:?}"
    );
}

#[test]
fn every_workspace_member_is_described() {
    let members = workspace_members();
    assert_all_mentioned("Crates", "workspace members (as `dir/`)", &members, |m| {
        format!("\n{m}/ ")
    });
    let packages: Vec<String> = members.iter().map(|m| package_name(m)).collect();
    assert_all_mentioned("Crates", "packages", &packages, |p| format!(" {p} "));
}

#[test]
fn every_server_module_is_described() {
    assert_all_mentioned("Server modules", "modules", &server_modules(), |m| {
        format!("| `{m}` |")
    });
}

#[test]
fn every_redb_table_is_described() {
    assert_all_mentioned("Storage", "redb tables", &redb_tables(), |t| {
        format!("`{t}`")
    });
}

#[test]
fn every_postgres_table_is_described() {
    assert_all_mentioned("Storage", "PostgreSQL tables", &postgres_tables(), |t| {
        format!("`{t}`")
    });
}

/// README.md's configuration tables are rendered from `config_reference::FIELDS` and the
/// defaults in the code, the same source `roost config default` prints: a field added, renamed
/// or given a new default without its row fails here. `ROOST_BLESS=1` rewrites the tables.
#[test]
fn readme_configuration_tables_are_the_reference() {
    use roost_server::config_reference::{SECTIONS, markdown_table};
    let path = root().join("README.md");
    let mut readme = read(&path);
    let mut stale = Vec::new();
    for section in SECTIONS {
        let name = if section.is_empty() { "top" } else { section };
        let marker = format!("<!-- config-table: {name} -->\n");
        let start = readme
            .find(&marker)
            .unwrap_or_else(|| panic!("README.md has no {marker:?}"))
            + marker.len();
        let end = start
            + readme[start..]
                .find("<!-- end config-table -->")
                .unwrap_or_else(|| panic!("README.md: table {name} has no end marker"));
        let expected = markdown_table(section);
        if readme[start..end] != expected {
            stale.push(format!("[{name}] expected:\n{expected}"));
            readme.replace_range(start..end, &expected);
        }
    }
    if std::env::var_os("ROOST_BLESS").is_some() {
        std::fs::write(&path, readme).unwrap();
        return;
    }
    assert!(
        stale.is_empty(),
        "README.md's configuration tables differ from server/src/config_reference.rs \
         (rerun with ROOST_BLESS=1 to rewrite them):\n{}",
        stale.join("\n")
    );
}
