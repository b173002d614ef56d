/**
 * A plugin's live log: the last records, then new ones as they come (`StreamLogs` with
 * `follow`), with level and text filters and a pause. When the stream drops it is opened
 * again right after the last record shown (`after_cursors`), so nothing is shown twice and
 * nothing is skipped; records the daemon rotated away first are shown as the API's gap.
 */
import { useEffect, useRef, useState } from "react";
import type { LogGap, LogRecord } from "../../clients/web/src/gen/toru/v1/log_service_pb";
import { LogLevel, LogStream } from "../../clients/web/src/gen/toru/v1/log_service_pb";
import type { Session } from "./api";
import { keepOpen, type Link, started } from "./live";
import { LinkState } from "./plugins";
import { date } from "./ui";

/** Lines kept on the page; older ones are dropped from view (they stay in the daemon's log). */
const MAX_LINES = 5000;

type Line =
  | { kind: "record"; record: LogRecord }
  | { kind: "gap"; gap: LogGap }
  | { kind: "resumed"; at: number };

export function LogView({ session, id }: { session: Session; id: string }) {
  const [tail, setTail] = useState(200);
  const [follow, setFollow] = useState(true);
  const [minLevel, setMinLevel] = useState(LogLevel.UNSPECIFIED);
  const [contains, setContains] = useState("");
  const [paused, setPaused] = useState(false);
  const [lines, setLines] = useState<Line[]>([]);
  const [held, setHeld] = useState(0);
  const [link, setLink] = useState<Link>({ ok: true });
  const pausedRef = useRef(paused);
  const heldLines = useRef<Line[]>([]);
  const box = useRef<HTMLPreElement>(null);
  const atBottom = useRef(true);

  // The ref changes with the click, so no record that arrives after it is shown.
  const togglePause = () => {
    pausedRef.current = !paused;
    setPaused(!paused);
    if (paused && heldLines.current.length) {
      const flush = heldLines.current;
      heldLines.current = [];
      setHeld(0);
      setLines((all) => [...all, ...flush].slice(-MAX_LINES));
    }
  };

  useEffect(() => {
    const abort = new AbortController();
    let cursor = "";
    let lastSeq = -1n;
    let opened = false;
    setLines([]);
    heldLines.current = [];
    setHeld(0);
    const show = (more: Line[]) => {
      if (pausedRef.current) {
        heldLines.current = [...heldLines.current, ...more].slice(-MAX_LINES);
        setHeld(heldLines.current.length);
      } else {
        setLines((all) => [...all, ...more].slice(-MAX_LINES));
      }
    };
    keepOpen(
      abort.signal,
      async (signal) => {
        const filter = { pluginIds: [id], minLevel, contains };
        const start = cursor
          ? { case: "afterCursors" as const, value: { cursors: [cursor] } }
          : { case: "tail" as const, value: tail };
        const { iterator, first } = await started((onHeader) =>
          session.client.logs.streamLogs({ filter, start, follow }, { signal, onHeader }),
        );
        // The daemon answered: the stream is open again.
        if (opened) show([{ kind: "resumed", at: Date.now() }]);
        opened = true;
        setLink({ ok: true });
        for (let next = await first; !next.done; next = await iterator.next()) {
          const msg = next.value;
          const more: Line[] = [];
          if (msg.gap) more.push({ kind: "gap", gap: msg.gap });
          for (const record of msg.records) {
            cursor = record.cursor;
            if (record.seq <= lastSeq) continue;
            lastSeq = record.seq;
            more.push({ kind: "record", record });
          }
          if (more.length) show(more);
        }
        if (!follow) abort.abort();
      },
      setLink,
    );
    return () => abort.abort();
  }, [session, id, tail, follow, minLevel, contains]);

  useEffect(() => {
    const el = box.current;
    if (el && atBottom.current) el.scrollTop = el.scrollHeight;
  }, [lines]);

  return (
    <div className="log">
      <form className="log-controls" onSubmit={(e) => e.preventDefault()}>
        <label>
          Last{" "}
          <select value={tail} onChange={(e) => setTail(Number(e.target.value))}>
            {[50, 200, 1000].map((n) => (
              <option key={n} value={n}>
                {n}
              </option>
            ))}
          </select>
        </label>
        <label>
          Level{" "}
          <select value={minLevel} onChange={(e) => setMinLevel(Number(e.target.value) as LogLevel)}>
            <option value={LogLevel.UNSPECIFIED}>all</option>
            {[LogLevel.TRACE, LogLevel.DEBUG, LogLevel.INFO, LogLevel.WARN, LogLevel.ERROR].map((l) => (
              <option key={l} value={l}>
                {LogLevel[l].toLowerCase()} and above
              </option>
            ))}
          </select>
        </label>
        <label className="grow">
          Contains{" "}
          <input
            type="search"
            name="contains"
            placeholder="text"
            defaultValue={contains}
            onKeyDown={(e) => {
              if (e.key === "Enter") setContains(e.currentTarget.value);
            }}
            onBlur={(e) => setContains(e.currentTarget.value)}
          />
        </label>
        <label>
          <input type="checkbox" checked={follow} onChange={(e) => setFollow(e.target.checked)} /> Follow
        </label>
        <button type="button" aria-pressed={paused} onClick={togglePause}>
          {paused ? `Resume${held ? ` (${held} new)` : ""}` : "Pause"}
        </button>
        {follow && <LinkState link={link} />}
      </form>
      <pre
        className="lines"
        ref={box}
        tabIndex={0}
        aria-label={`Log of ${id}`}
        data-testid="log"
        onScroll={(e) => {
          const el = e.currentTarget;
          atBottom.current = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
        }}
      >
        {lines.length === 0 && <span className="muted">No records yet.</span>}
        {lines.map((line) =>
          line.kind === "record" ? (
            <Record key={`r${line.record.seq}`} record={line.record} />
          ) : line.kind === "gap" ? (
            <div key={`g${line.gap.fromSeq}`} className="gap" data-testid="log-gap">
              — records {String(line.gap.fromSeq)}–{String(line.gap.toSeq)} were rotated away before they could
              be sent —
            </div>
          ) : (
            <div key={`c${line.at}`} className="resumed" data-testid="log-resumed">
              — reconnected; continuing after the last record shown —
            </div>
          ),
        )}
      </pre>
    </div>
  );
}

function Record({ record: r }: { record: LogRecord }) {
  const level = LogLevel[r.level]?.toLowerCase() ?? "";
  const time = date(r.time);
  return (
    <div className={`rec lvl-${level} ${r.stream === LogStream.SUPERVISOR ? "supervisor" : ""}`} data-seq={String(r.seq)}>
      <span className="t">{time ? time.toLocaleTimeString() : ""}</span> <span className="l">{level || "-"}</span>{" "}
      <span className="m">{r.message}</span>
      {r.fieldsJson && <span className="f"> {r.fieldsJson}</span>}
      {r.continued && <span className="muted"> ↩</span>}
    </div>
  );
}
