//! The human form of `roost admin` answers: aligned columns with a header line.

use super::Reply;

/// Left-aligned columns, two spaces apart.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = String>| {
        let mut text = String::new();
        for (cell, width) in cells.zip(&widths) {
            text.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().map(|h| (*h).to_owned()));
    for row in rows {
        line(&mut row.iter().cloned());
    }
    out
}

fn yes_no(flag: bool) -> String {
    if flag { "yes" } else { "no" }.to_owned()
}

/// Renders a reply for a terminal.
pub(crate) fn render(reply: &Reply) -> String {
    match reply {
        Reply::Users { users } => columns(
            &["USER", "DEVICES", "DEACTIVATED", "CREATED_MS"],
            &users
                .iter()
                .map(|u| {
                    vec![
                        u.name.clone(),
                        u.clients.to_string(),
                        yes_no(u.deactivated),
                        u.created_ms.to_string(),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
        Reply::User { user, devices } => {
            let mut out = format!(
                "user         {}\ndeactivated  {}\ncreated_ms   {}\ndevices      {}\n",
                user.name,
                yes_no(user.deactivated),
                user.created_ms,
                user.clients
            );
            if !devices.is_empty() {
                out.push('\n');
                out.push_str(&devices_table(devices));
            }
            out
        }
        Reply::Deactivated {
            name,
            removed_clients,
        } => format!("deactivated {name}: {removed_clients} device(s) removed\n"),
        Reply::Devices { devices, .. } => devices_table(devices),
        Reply::DeviceRemoved { client } => format!("removed {client}\n"),
        Reply::Tokens { tokens } => columns(
            &["ID", "USES_ALLOWED", "USED"],
            &tokens
                .iter()
                .map(|t| vec![t.id.clone(), t.uses_allowed.to_string(), t.used.to_string()])
                .collect::<Vec<_>>(),
        ),
        Reply::Stats { domain, stats } => {
            let mut out = columns(
                &[
                    "DOMAIN",
                    "USERS",
                    "DEACTIVATED",
                    "CLIENTS",
                    "GROUPS",
                    "QUEUED",
                ],
                &[vec![
                    domain.clone(),
                    stats.users.to_string(),
                    stats.deactivated_users.to_string(),
                    stats.clients.to_string(),
                    stats.groups.to_string(),
                    stats.queued_messages.to_string(),
                ]],
            );
            out.push('\n');
            out.push_str(&columns(
                &["OUTBOX_PEER", "ENTRIES"],
                &stats
                    .outbox
                    .iter()
                    .map(|(peer, n)| vec![peer.clone(), n.to_string()])
                    .collect::<Vec<_>>(),
            ));
            out
        }
        Reply::Backup {
            dir,
            database_bytes,
            files,
        } => format!(
            "backup written to {} ({} bytes of database; files: {})\n",
            dir.display(),
            database_bytes,
            files.join(", ")
        ),
    }
}

fn devices_table(devices: &[super::Device]) -> String {
    columns(
        &["DEVICE", "CLIENT", "CREDENTIAL_NOT_AFTER"],
        &devices
            .iter()
            .map(|d| {
                vec![
                    d.device.clone(),
                    d.client.clone(),
                    d.credential_not_after.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    )
}
