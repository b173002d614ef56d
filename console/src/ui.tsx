/** Small shared pieces: navigation, toasts, state badges, time formatting. */
import { useEffect, useState } from "react";
import { type Timestamp, timestampDate } from "@bufbuild/protobuf/wkt";
import { PluginState } from "../../clients/web/src/gen/toru/v1/plugin_pb";

/** Moves to a console path (`/plugins/hello`); what a plugin UI's `api.navigate` does too. */
export function navigate(path: string): void {
  window.location.hash = "#" + (path.startsWith("/") ? path : "/" + path);
}

/** Sets the page title while a view is shown. */
export function useTitle(title: string): void {
  useEffect(() => {
    document.title = `${title} · torud`;
  }, [title]);
}

export type ToastKind = "success" | "error" | "info";
interface ToastItem {
  id: number;
  message: string;
  kind: ToastKind;
}
let nextToast = 1;
const listeners = new Set<(t: ToastItem) => void>();

/** Shows a message for a few seconds (errors stay until dismissed). */
export function toast(message: string, kind: ToastKind = "info"): void {
  const item = { id: nextToast++, message: String(message), kind };
  listeners.forEach((l) => l(item));
}

export function Toasts() {
  const [items, setItems] = useState<ToastItem[]>([]);
  useEffect(() => {
    const add = (t: ToastItem) => {
      setItems((all) => [...all.slice(-4), t]);
      if (t.kind !== "error") {
        setTimeout(() => setItems((all) => all.filter((x) => x.id !== t.id)), 5000);
      }
    };
    listeners.add(add);
    return () => {
      listeners.delete(add);
    };
  }, []);
  return (
    <div className="toasts" role="status" aria-live="polite">
      {items.map((t) => (
        <div key={t.id} className={`toast ${t.kind}`} data-kind={t.kind}>
          <span>{t.message}</span>
          <button
            type="button"
            className="quiet"
            aria-label="Dismiss"
            onClick={() => setItems((all) => all.filter((x) => x.id !== t.id))}
          >
            ×
          </button>
        </div>
      ))}
    </div>
  );
}

export function stateName(state: PluginState): string {
  return (PluginState[state] ?? "UNKNOWN").toLowerCase();
}

export function StateBadge({ state }: { state: PluginState }) {
  const name = stateName(state);
  return (
    <span className={`badge state-${name}`} data-state={name}>
      {name}
    </span>
  );
}

export function HealthBadge({ healthy, state }: { healthy: boolean; state: PluginState }) {
  if (state !== PluginState.RUNNING) return <span className="muted">–</span>;
  return <span className={`badge ${healthy ? "healthy" : "unhealthy"}`}>{healthy ? "healthy" : "unhealthy"}</span>;
}

export function date(ts: Timestamp | undefined): Date | null {
  return ts ? timestampDate(ts) : null;
}

export function formatTime(ts: Timestamp | undefined): string {
  const d = date(ts);
  return d ? d.toLocaleString() : "–";
}

/** The current time, updated every second while mounted (for countdowns). */
export function useNow(): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, []);
  return now;
}

/** "in 3 s", "now": how long until `at`. */
export function until(at: Date, now: number): string {
  const s = Math.ceil((at.getTime() - now) / 1000);
  return s > 0 ? `in ${s} s` : "now";
}
