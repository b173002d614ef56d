/** The plugins table: live state, and the lifecycle actions for an admin. */
import { useState } from "react";
import type { Plugin } from "../../clients/web/src/gen/toru/v1/plugin_pb";
import { PluginState } from "../../clients/web/src/gen/toru/v1/plugin_pb";
import { type Session, describe } from "./api";
import { type Link, useLivePlugins } from "./live";
import { HealthBadge, StateBadge, toast, useNow, useTitle } from "./ui";

export function PluginsView({ session }: { session: Session }) {
  useTitle("Plugins");
  const { plugins, link, error } = useLivePlugins(session);
  const [busy, setBusy] = useState(false);
  const admin = session.role === "admin";
  async function rescan() {
    setBusy(true);
    try {
      const r = await session.client.plugins.rescanPlugins({});
      const parts = [
        r.added.length && `added ${r.added.join(", ")}`,
        r.removed.length && `removed ${r.removed.join(", ")}`,
        r.updated.length && `updated ${r.updated.join(", ")}`,
        r.skipped.length && `skipped ${r.skipped.map((s) => `${s.path} (${s.reason})`).join(", ")}`,
      ].filter(Boolean);
      toast(parts.length ? `Rescan: ${parts.join("; ")}` : "Rescan: nothing changed", "success");
    } catch (e) {
      toast(describe(e), "error");
    } finally {
      setBusy(false);
    }
  }
  return (
    <section aria-labelledby="plugins-title">
      <div className="heading">
        <h1 id="plugins-title">Plugins</h1>
        <LinkState link={link} />
        {admin && (
          <button type="button" onClick={rescan} disabled={busy}>
            Rescan
          </button>
        )}
      </div>
      {error && (
        <p className="error" role="alert">
          {error}
        </p>
      )}
      {plugins === null ? (
        <p className="muted">Loading…</p>
      ) : plugins.length === 0 ? (
        <p className="muted">No plugins in the plugins directory.</p>
      ) : (
        <div className="scroll">
          <table className="plugins">
            <thead>
              <tr>
                <th scope="col">Plugin</th>
                <th scope="col">State</th>
                <th scope="col">Health</th>
                <th scope="col">PID</th>
                <th scope="col">Restarts</th>
                <th scope="col">Version</th>
                <th scope="col">Last error</th>
                {admin && <th scope="col">Actions</th>}
              </tr>
            </thead>
            <tbody>
              {plugins.map((p) => (
                <Row key={p.id} plugin={p} session={session} />
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}

function Row({ plugin: p, session }: { plugin: Plugin; session: Session }) {
  return (
    <tr data-plugin={p.id}>
      <th scope="row" data-label="Plugin">
        <a href={`#/plugins/${encodeURIComponent(p.id)}`}>{p.name || p.id}</a>
        {p.name && p.name !== p.id && <div className="muted small">{p.id}</div>}
      </th>
      <td data-label="State">
        <StateBadge state={p.state} />
      </td>
      <td data-label="Health">
        <HealthBadge healthy={p.healthy} state={p.state} />
      </td>
      <td data-label="PID" className="num" data-field="pid">
        {p.pid || "–"}
      </td>
      <td data-label="Restarts" className="num">
        {p.restartCount}
      </td>
      <td data-label="Version">{p.version}</td>
      <td data-label="Last error" className="last-error">
        {p.lastError || <span className="muted">–</span>}
      </td>
      {session.role === "admin" && (
        <td data-label="Actions">
          <Actions plugin={p} session={session} />
        </td>
      )}
    </tr>
  );
}

/** Enable or disable, and restart; each error shown as the API words it. */
export function Actions({ plugin: p, session }: { plugin: Plugin; session: Session }) {
  const [busy, setBusy] = useState(false);
  const act = async (what: string, call: () => Promise<unknown>) => {
    setBusy(true);
    try {
      await call();
      toast(`${what} ${p.id}`, "success");
    } catch (e) {
      toast(`${what} ${p.id}: ${describe(e)}`, "error");
    } finally {
      setBusy(false);
    }
  };
  const id = { pluginId: p.id };
  const plugins = session.client.plugins;
  return (
    <div className="actions">
      {p.enabled ? (
        <button type="button" disabled={busy} onClick={() => act("Disabled", () => plugins.disablePlugin(id))}>
          Disable
        </button>
      ) : (
        <button type="button" disabled={busy} onClick={() => act("Enabled", () => plugins.enablePlugin(id))}>
          Enable
        </button>
      )}
      <button
        type="button"
        disabled={busy || !p.enabled || p.state === PluginState.STOPPING}
        onClick={() => act("Restarted", () => plugins.restartPlugin(id))}
      >
        Restart
      </button>
    </div>
  );
}

/** "live", or why the stream is down and when it is tried again. */
export function LinkState({ link }: { link: Link }) {
  const now = useNow();
  if (link.ok) {
    return (
      <span className="link ok" data-testid="link">
        live
      </span>
    );
  }
  const s = Math.max(0, Math.ceil((link.retryAt - now) / 1000));
  return (
    <span className="link down" data-testid="link" title={link.error}>
      reconnecting{s ? ` in ${s} s` : "…"}
    </span>
  );
}
