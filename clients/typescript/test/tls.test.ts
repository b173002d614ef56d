/**
 * TLS: the helper against a daemon serving TLS and requiring client certificates (a
 * throw-away PKI from clients/test-pki.sh).
 */
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import { connect, unary } from "../src";
import { Daemon, ROOT, startDaemon, waitRunning } from "./daemon";

let daemon: Daemon;
let pki = "";

before(async () => {
  daemon = await startDaemon((dir) => {
    pki = path.join(dir, "pki");
    execFileSync("bash", [path.join(ROOT, "clients/test-pki.sh"), pki]);
    return ["--tls-cert", path.join(pki, "server.pem"), "--tls-key", path.join(pki, "server.key"),
      "--tls-client-ca", path.join(pki, "ca.pem")];
  });
});

after(async () => {
  await daemon?.stop();
});

test("TLS with a client certificate; refused without one", async () => {
  const address = `https://localhost:${daemon.address.split(":").pop()}`;
  const tlsCa = path.join(pki, "ca.pem");
  const client = connect({ address, dataDir: daemon.dataDir, tlsCa,
    tlsCert: path.join(pki, "client.pem"), tlsKey: path.join(pki, "client.key") });
  const anonymous = connect({ address, dataDir: daemon.dataDir, tlsCa });
  try {
    await waitRunning(client, ["hello", "py-echo"]);
    const r = await unary(client.plugins, client.plugins.listPlugins, { pageSize: 0, pageToken: "" });
    assert.deepEqual(r.plugins.map((p) => p.id), ["hello", "py-echo"]);
    await assert.rejects(unary(anonymous.plugins, anonymous.plugins.listPlugins, { pageSize: 0, pageToken: "" }, 10_000),
      (e: grpc.ServiceError) => e.code === grpc.status.UNAVAILABLE);
  } finally {
    client.close();
    anonymous.close();
  }
});
