/**
 * The followers against a fake gRPC-Web server (a `fetch` playing one script per call:
 * messages, then a status in the trailer): UNAVAILABLE "the daemon is upgrading" resumes
 * from the last seq or cursors yielded, with no duplicate and gaps passed on; other codes
 * are raised at once; the reconnect window runs out. Waits use deadlines, never sleeps.
 */
import { describe, test } from "node:test";
import * as assert from "node:assert/strict";
import { type DescMessage, type MessageShape, create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { createToruClient, followEvents, followLogs } from "../src";
import { EventSchema } from "../src/gen/toru/v1/event_pb";
import {
  LogRecordSchema, type StreamLogsRequest, StreamLogsRequestSchema, type StreamLogsResponse, StreamLogsResponseSchema,
} from "../src/gen/toru/v1/log_service_pb";
import {
  type WatchEventsRequest, WatchEventsRequestSchema, type WatchEventsResponse, WatchEventsResponseSchema,
} from "../src/gen/toru/v1/plugin_service_pb";

const UPGRADING = "the daemon is upgrading";

type Script<T> = [T[], Code];

function frame(flags: number, data: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(5 + data.length);
  out[0] = flags;
  new DataView(out.buffer).setUint32(1, data.length);
  out.set(data, 5);
  return out;
}

/** A `fetch` answering `path` by its scripts in turn (the last one repeats), keeping the requests. */
function fakeFetch<Req extends DescMessage, Res extends DescMessage>(
  path: string, reqSchema: Req, resSchema: Res, scripts: Script<MessageShape<Res>>[],
) {
  const requests: MessageShape<Req>[] = [];
  const fetch: typeof globalThis.fetch = async (input, init) => {
    assert.ok(String(input).endsWith(path), String(input));
    const body = new Uint8Array(init!.body as ArrayBuffer);
    requests.push(fromBinary(reqSchema, body.subarray(5)));
    const [messages, code] = scripts[Math.min(requests.length, scripts.length) - 1];
    const message = code === Code.Unavailable ? UPGRADING : "refused";
    const parts = messages.map((m) => frame(0, toBinary(resSchema, m)));
    parts.push(frame(0x80, new TextEncoder().encode(`grpc-status: ${code}\r\ngrpc-message: ${encodeURIComponent(message)}\r\n`)));
    return new Response(new Blob(parts), { status: 200, headers: { "content-type": "application/grpc-web+proto" } });
  };
  return { fetch, requests };
}

const event = (seq: number) => create(WatchEventsResponseSchema, { event: create(EventSchema, { seq: BigInt(seq), pluginId: "p" }) });
const record = (plugin: string, seq: number) =>
  create(LogRecordSchema, { pluginId: plugin, seq: BigInt(seq), cursor: `${plugin}:${seq}` });

async function collect<T>(follower: AsyncGenerator<T>): Promise<{ items: T[]; error: unknown }> {
  const items: T[] = [];
  try {
    for await (const item of follower) items.push(item);
  } catch (error) {
    return { items, error };
  }
  return { items, error: undefined };
}

const codeOf = (e: unknown) => (e instanceof ConnectError ? e.code : `not a ConnectError: ${e}`);

describe("followers against a fake gRPC-Web server", () => {
  test("events resume after UNAVAILABLE from the last seq, with no duplicate, gaps passed on", async () => {
    const gap = create(WatchEventsResponseSchema, { gap: { firstSeq: 3n, lastSeq: 4n, reason: "lost" } });
    const fake = fakeFetch("/toru.v1.PluginService/WatchEvents", WatchEventsRequestSchema, WatchEventsResponseSchema, [
      [[event(1), event(2)], Code.Unavailable],
      [[event(2), gap, event(5)], Code.InvalidArgument],
    ]);
    const client = createToruClient({ baseUrl: "http://fake", token: "t", fetch: fake.fetch });
    const { items, error } = await collect(followEvents(client.plugins, { afterSeq: 0n, pluginIds: ["p"] }));
    assert.equal(codeOf(error), Code.InvalidArgument);
    assert.deepEqual(items.map((r: WatchEventsResponse) => r.event ? Number(r.event.seq) : `gap ${r.gap?.lastSeq}`),
      [1, 2, "gap 4", 5]);
    assert.deepEqual(fake.requests.map((r: WatchEventsRequest) => r.afterSeq), [0n, 2n]);
    assert.deepEqual(fake.requests.map((r: WatchEventsRequest) => r.pluginIds), [["p"], ["p"]]);
  });

  test("a code other than UNAVAILABLE is raised at once", async () => {
    const fake = fakeFetch("/toru.v1.PluginService/WatchEvents", WatchEventsRequestSchema, WatchEventsResponseSchema, [
      [[], Code.PermissionDenied],
    ]);
    const client = createToruClient({ baseUrl: "http://fake", token: "t", fetch: fake.fetch });
    const { items, error } = await collect(followEvents(client.plugins));
    assert.equal(codeOf(error), Code.PermissionDenied);
    assert.equal(items.length, 0);
    assert.equal(fake.requests.length, 1);
  });

  test("events give up after the reconnect window, raising the last error", async () => {
    const fake = fakeFetch("/toru.v1.PluginService/WatchEvents", WatchEventsRequestSchema, WatchEventsResponseSchema, [
      [[], Code.Unavailable],
    ]);
    // The fake answers each call with headers; a daemon refusing during a handover does not.
    const refusing: typeof fetch = async (input, init) => {
      await fake.fetch(input, init);
      throw new TypeError("fetch failed");
    };
    const client = createToruClient({ baseUrl: "http://fake", token: "t", fetch: refusing });
    const started = Date.now();
    const { error } = await collect(followEvents(client.plugins, {}, { reconnectWindowMs: 500 }));
    assert.equal(codeOf(error), Code.Unknown);
    assert.ok((error as ConnectError).cause instanceof TypeError);
    assert.ok(Date.now() - started >= 500 && fake.requests.length > 2, `${fake.requests.length} requests`);
    assert.equal(fake.requests[0].afterSeq, undefined);
  });

  test("logs resume with per-plugin cursors", async () => {
    const fake = fakeFetch("/toru.v1.LogService/StreamLogs", StreamLogsRequestSchema, StreamLogsResponseSchema, [
      [[create(StreamLogsResponseSchema, { records: [record("a", 1), record("a", 2), record("b", 7)] })], Code.Unavailable],
      [[create(StreamLogsResponseSchema, {
        gap: { pluginId: "b", fromSeq: 8n, toSeq: 9n },
        records: [record("a", 2), record("a", 3), record("b", 10)],
      })], Code.Unavailable],
      [[], Code.PermissionDenied],
    ]);
    const client = createToruClient({ baseUrl: "http://fake", token: "t", fetch: fake.fetch });
    const { items, error } = await collect(followLogs(client.logs, {
      filter: { minLevel: 2 }, start: { case: "afterCursors", value: { cursors: ["c:3"] } },
    }));
    assert.equal(codeOf(error), Code.PermissionDenied);
    assert.deepEqual(items.map((b: StreamLogsResponse) => b.records.map((r) => r.cursor)), [["a:1", "a:2", "b:7"], ["a:3", "b:10"]]);
    assert.equal(items[1].gap?.toSeq, 9n);
    const cursors = (r: StreamLogsRequest) => (r.start.case === "afterCursors" ? [...r.start.value.cursors].sort() : []);
    assert.deepEqual(fake.requests.map(cursors), [["c:3"], ["a:2", "b:7", "c:3"], ["a:3", "b:10", "c:3"]]);
    assert.ok(fake.requests.every((r: StreamLogsRequest) => r.follow && r.filter?.minLevel === 2));
  });
});
