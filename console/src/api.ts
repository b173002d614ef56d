/**
 * The console's connection to the daemon: the generated gRPC-Web client (clients/web) on
 * this page's own origin, the signed-in token (the tab's session storage, never a URL or a
 * cookie) and the role it carries.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { type ToruClient, createToruClient } from "../../clients/web/src/index";

export type Role = "admin" | "read";

export interface Session {
  client: ToruClient;
  role: Role;
  /** Forgets the token and returns to the sign-in page. */
  signOut(): void;
}

const TOKEN_KEY = "torud.token";
const ROLE_KEY = "torud.role";

/** The token and role this tab signed in with, if it did. */
export function storedSignIn(): { token: string; role: Role } | null {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const role = sessionStorage.getItem(ROLE_KEY);
  return token && (role === "admin" || role === "read") ? { token, role } : null;
}

/** Forgets this tab's token and role. */
export function forgetSignIn(): void {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(ROLE_KEY);
}

export function connect(token: string): ToruClient {
  return createToruClient({ baseUrl: window.location.origin, token });
}

/**
 * Checks `token`, finds its role, and keeps both in this tab's session storage. Listing plugins needs a valid token of either role;
 * disabling the plugin with an empty id needs the admin role and changes nothing: the
 * daemon checks the role before the request, so a read token gets PERMISSION_DENIED and
 * an admin token INVALID_ARGUMENT (no plugin has an empty id).
 */
export async function signIn(token: string): Promise<Role> {
  const client = connect(token);
  await client.plugins.listPlugins({ pageSize: 1 });
  let role: Role;
  try {
    await client.plugins.disablePlugin({ pluginId: "" });
    throw new Error("the daemon accepted a disable of the empty plugin id");
  } catch (e) {
    const code = e instanceof ConnectError ? e.code : null;
    if (code === Code.PermissionDenied) role = "read";
    else if (code === Code.InvalidArgument) role = "admin";
    else throw e;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  sessionStorage.setItem(ROLE_KEY, role);
  return role;
}

/** An error as the API words it: its code's name and its message. */
export function describe(e: unknown): string {
  if (e instanceof ConnectError) {
    return `${codeName(e.code)}: ${e.rawMessage}`;
  }
  return e instanceof Error ? e.message : String(e);
}

export function codeName(code: Code): string {
  return (Code[code] ?? String(code)).replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** True when a stream ended because we cancelled it (leaving the page), not by a failure. */
export function isCancel(e: unknown): boolean {
  return e instanceof ConnectError ? e.code === Code.Canceled : (e as Error)?.name === "AbortError";
}
