//! The dashboard's HTML: one page whose small script fetches `/api/summary` every second and
//! draws the figures (SVG lines, no library, no CDN: it works offline), and a job's page,
//! rendered on the server.

use crate::admin::JobDetails;

/// Escapes text for HTML (element content and quoted attributes).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d2230; background: #f7f8fa; }
h1 { font-size: 1.3rem; margin: 0 0 1rem; } h2 { font-size: 1rem; margin: 1.5rem 0 .5rem; }
.tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(11rem, 1fr)); gap: .75rem; }
.tile { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: .6rem .8rem; }
.tile .value { font-size: 1.6rem; font-variant-numeric: tabular-nums; }
.tile .label { color: #5b6375; font-size: .8rem; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(18rem, 1fr)); gap: .75rem; }
svg { width: 100%; height: 70px; background: #fff; border: 1px solid #dde1e8; border-radius: 6px; }
polyline { fill: none; stroke: #3867d6; stroke-width: 1.5; }
table { border-collapse: collapse; background: #fff; width: 100%; }
td, th { border-bottom: 1px solid #e6e9ef; padding: .35rem .5rem; text-align: left; vertical-align: top; }
code { font-size: .85em; } .muted { color: #5b6375; } .bad { color: #b3261e; }
button { cursor: pointer; } form { margin: 1rem 0; }
"#;

/// The main page. `actions`: whether retry buttons are offered.
pub(super) fn index(actions: bool) -> String {
    format!(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ackloop</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body data-actions="{actions}">
<h1>ackloop <span class="muted">— the loop, live</span> <small class="muted">updated <span id="updated">…</span></small></h1>
<p id="error" class="bad"></p>
<div class="tiles">
 <div class="tile"><div class="value" id="signups-rate">…</div><div class="label">signups/s (10 s)</div></div>
 <div class="tile"><div class="value" id="completions-rate">…</div><div class="label">completions/s (10 s)</div></div>
 <div class="tile"><div class="value" id="done-recent">…</div><div class="label">done in the last 60 s</div></div>
 <div class="tile"><div class="value" id="pending">…</div><div class="label">pending jobs</div></div>
 <div class="tile"><div class="value" id="oldest-pending">…</div><div class="label">oldest pending (s)</div></div>
 <div class="tile"><div class="value" id="failed">…</div><div class="label">failed jobs</div></div>
 <div class="tile"><div class="value" id="queue-usage">…</div><div class="label">notification queue used (%)</div></div>
 <div class="tile"><div class="value" id="commit-to-done">…</div><div class="label">insert → done p50 / p99 (ms, 60 s)</div></div>
</div>
<h2>The last minute</h2>
<div class="charts">
 <div><div class="muted">signups per second</div><svg id="chart-signups" viewBox="0 0 600 70" preserveAspectRatio="none"><polyline/></svg></div>
 <div><div class="muted">completions per second</div><svg id="chart-completions" viewBox="0 0 600 70" preserveAspectRatio="none"><polyline/></svg></div>
 <div><div class="muted">insert → done, median ms</div><svg id="chart-commit-to-done" viewBox="0 0 600 70" preserveAspectRatio="none"><polyline/></svg></div>
</div>
<h2>Acknowledgement path <span class="muted">(from the metrics endpoints, last 10 s)</span></h2>
<div class="charts">
 <div><div class="muted">commit → claim, median ms</div><svg id="chart-commit_to_claim" viewBox="0 0 600 70" preserveAspectRatio="none"><polyline/></svg></div>
 <div><div class="muted">claim → done, median ms</div><svg id="chart-claim_to_done" viewBox="0 0 600 70" preserveAspectRatio="none"><polyline/></svg></div>
 <div><div class="muted">done → caller confirmed, median ms</div><svg id="chart-done_to_confirmed" viewBox="0 0 600 70" preserveAspectRatio="none"><polyline/></svg></div>
</div>
<table id="stages"><tr><th>stage</th><th>count</th><th>p50 ms</th><th>p99 ms</th></tr>
 <tr id="stage-commit_to_claim"><td>commit → claim</td><td>-</td><td>-</td><td>-</td></tr>
 <tr id="stage-claim_to_done"><td>claim → done</td><td>-</td><td>-</td><td>-</td></tr>
 <tr id="stage-done_to_confirmed"><td>done → caller confirmed</td><td>-</td><td>-</td><td>-</td></tr>
</table>
<p class="muted" id="listener-health">Listener health: start the dashboard with --metrics-from to see it.</p>
<h2>Failed jobs</h2>
<p id="action-result" class="muted"></p>
<table id="failed-jobs"><thead><tr><th>job</th><th>user</th><th>attempts</th><th>failed at</th><th>last error</th><th></th></tr></thead><tbody></tbody></table>
<form action="/jobs" method="get">Find a job by email: <input name="email" type="email" required> <button>show</button></form>
<script>
const actions = document.body.dataset.actions === "true";
let token = sessionStorage.getItem("ackloop-token");
// Each stage's median at every refresh, the last minute of them: the endpoints give windows,
// not a history.
const stageHistory = {{ commit_to_claim: [], claim_to_done: [], done_to_confirmed: [] }};
const text = (id, value) => {{ document.getElementById(id).textContent = value; }};
const fixed = (x, digits) => x === null || x === undefined ? "-" : Number(x).toFixed(digits);
function draw(id, values) {{
  const max = Math.max(1, ...values.map(v => v || 0));
  const step = 600 / Math.max(1, values.length - 1);
  const points = values.map((v, i) => `${{(i * step).toFixed(1)}},${{(68 - (v || 0) / max * 64).toFixed(1)}}`);
  document.querySelector(`#${{id}} polyline`).setAttribute("points", points.join(" "));
}}
function row(job) {{
  const tr = document.createElement("tr");
  tr.dataset.jobId = job.job_id;
  const cells = [job.job_id, job.user_id, job.attempts, job.failed_at || "", job.last_error || ""];
  cells.forEach((value, i) => {{
    const td = document.createElement("td");
    if (i === 0) {{ const a = document.createElement("a"); a.href = `/jobs/${{value}}`; a.textContent = value; td.appendChild(a); }}
    else td.textContent = value;
    if (i === 4) td.className = "last-error";
    tr.appendChild(td);
  }});
  const td = document.createElement("td");
  if (actions) {{
    const button = document.createElement("button");
    button.className = "retry"; button.textContent = "retry";
    button.onclick = () => retry(job.job_id, button);
    td.appendChild(button);
  }}
  tr.appendChild(td);
  return tr;
}}
async function retry(jobId, button) {{
  button.disabled = true;
  const headers = {{ "X-Requested-By": "ackloop" }};
  if (token) headers.Authorization = `Bearer ${{token}}`;
  let response = await fetch(`/api/jobs/${{jobId}}/retry`, {{ method: "POST", headers }});
  if (response.status === 401) {{
    token = window.prompt("This dashboard's token:") || "";
    sessionStorage.setItem("ackloop-token", token);
    // Job pages (emails) need it too, and a link carries no header: a cookie for this site.
    document.cookie = `ackloop_token=${{encodeURIComponent(token)}}; path=/; SameSite=Strict`;
    headers.Authorization = `Bearer ${{token}}`;
    response = await fetch(`/api/jobs/${{jobId}}/retry`, {{ method: "POST", headers }});
  }}
  const body = await response.json().catch(() => ({{}}));
  text("action-result", response.ok ? body.message : (body.error || `refused (${{response.status}})`));
  button.disabled = false;
  refresh();
}}
async function refresh() {{
  try {{
    const response = await fetch("/api/summary", {{ cache: "no-store" }});
    const s = await response.json();
    if (!response.ok) throw new Error(s.error || response.status);
    text("error", "");
    text("updated", new Date(s.at).toLocaleTimeString());
    text("signups-rate", fixed(s.signups_per_sec, 1));
    text("completions-rate", fixed(s.completions_per_sec, 1));
    text("done-recent", s.done_last_minute);
    text("pending", s.pending);
    text("oldest-pending", s.oldest_pending_secs === null ? "-" : fixed(s.oldest_pending_secs, 1));
    text("failed", s.failed_total);
    text("queue-usage", fixed(s.queue_usage * 100, 2));
    text("commit-to-done", `${{fixed(s.commit_to_done_p50_ms, 1)}} / ${{fixed(s.commit_to_done_p99_ms, 1)}}`);
    draw("chart-signups", s.series.map(x => x.signups));
    draw("chart-completions", s.series.map(x => x.done + x.failed));
    draw("chart-commit-to-done", s.series.map(x => x.commit_to_done_p50_ms));
    if (s.health) {{
      for (const stage of ["commit_to_claim", "claim_to_done", "done_to_confirmed"]) {{
        const h = s.health[stage];
        const cells = document.querySelectorAll(`#stage-${{stage}} td`);
        cells[1].textContent = h.count; cells[2].textContent = fixed(h.p50_ms, 1); cells[3].textContent = fixed(h.p99_ms, 1);
        const history = stageHistory[stage];
        history.push(h.p50_ms);
        if (history.length > 60) history.shift();
        draw(`chart-${{stage}}`, history);
      }}
      const share = s.health.table_check_share === null ? "-" : `${{(s.health.table_check_share * 100).toFixed(1)}}%`;
      const unreachable = s.health.unreachable.length ? ` Unreachable: ${{s.health.unreachable.join("; ")}}` : "";
      text("listener-health", `Listener reconnects: ${{s.health.listener_reconnects}}. Confirmations found by a table check instead of a notification: ${{share}}.${{unreachable}}`);
    }}
    const body = document.querySelector("#failed-jobs tbody");
    body.replaceChildren(...s.failed_jobs.map(row));
  }} catch (err) {{
    text("error", `cannot read the figures: ${{err.message}}`);
  }}
}}
// One refresh at a time: the next a second after the last one ended, however slow it was.
async function loop() {{ await refresh(); setTimeout(loop, 1000); }}
loop();
</script>
</body></html>
"##
    )
}

/// A job's page: what `ackloop jobs show` shows. The only page with an email on it.
pub(super) fn job(details: &JobDetails) -> String {
    let optional = |value: Option<String>| value.map_or_else(|| "-".to_owned(), |v| escape(&v));
    let problem = if details.player_missing {
        r#"<p class="bad" id="job-problem">the job is done but its player no longer exists: <code>ackloop jobs retry --repair</code> makes it again</p>"#
    } else {
        ""
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>job {job_id}</title><style>{STYLE}</style></head>
<body><h1><a href="/">ackloop</a> <span class="muted">— job</span> <code>{job_id}</code></h1>
{problem}
<table>
 <tr><th>status</th><td id="job-status">{status}</td></tr>
 <tr><th>email</th><td id="job-email">{email}</td></tr>
 <tr><th>user</th><td id="job-user">{user_id}</td></tr>
 <tr><th>player</th><td id="job-player">{player}</td></tr>
 <tr><th>attempts</th><td id="job-attempts">{attempts}</td></tr>
 <tr><th>last error</th><td id="job-last-error">{last_error}</td></tr>
 <tr><th>created</th><td>{created_at}</td></tr>
 <tr><th>updated</th><td>{updated_at}</td></tr>
 <tr><th>completed</th><td>{completed_at}</td></tr>
 <tr><th>next attempt after</th><td>{run_after}</td></tr>
</table></body></html>
"#,
        job_id = details.job_id,
        status = escape(details.status.as_str()),
        email = escape(details.email.as_deref().unwrap_or("(a service's own user)")),
        user_id = escape(details.user_id.as_str()),
        player = optional(details.player_id.as_ref().map(|id| id.to_string())),
        attempts = details.attempts,
        last_error = optional(details.last_error.clone()),
        created_at = details.created_at,
        updated_at = details.updated_at,
        completed_at = optional(details.completed_at.map(|at| at.to_string())),
        run_after = details.run_after,
    )
}

/// A page that asks for the token, keeps it in a cookie for this site, and loads again.
pub(super) fn token_needed() -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>token needed</title><style>{STYLE}</style></head>
<body><h1><a href="/">ackloop</a></h1><p id="token-needed">A job's page shows an email: this dashboard needs its token.</p>
<script>
const token = window.prompt("This dashboard's token:");
if (token) {{
  document.cookie = `ackloop_token=${{encodeURIComponent(token)}}; path=/; SameSite=Strict`;
  location.reload();
}}
</script></body></html>"#
    )
}

pub(super) fn not_found(what: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>not found</title><style>{STYLE}</style></head>
<body><h1><a href="/">ackloop</a></h1><p id="not-found">No job for {}.</p></body></html>"#,
        escape(what)
    )
}

pub(super) fn error(message: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>error</title><style>{STYLE}</style></head>
<body><h1><a href="/">ackloop</a></h1><p class="bad" id="error">{}</p></body></html>"#,
        escape(message)
    )
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            escape(r#"<b>"x" & 'y'</b>"#),
            "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;"
        );
    }
}
