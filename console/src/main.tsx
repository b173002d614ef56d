/**
 * The console's entry: React and ReactDOM on `window` (as Toru's frontend had them, for
 * plugin bundles built with React as an external), the hash router, sign-in, and the
 * frame around each view.
 */
import * as React from "react";
import * as ReactDOM from "react-dom";
import * as ReactDOMClient from "react-dom/client";
import { useEffect, useState } from "react";
import { type Role, type Session, connect, describe, forgetSignIn, signIn, storedSignIn } from "./api";
import { PluginsView } from "./plugins";
import { PluginView } from "./plugin";
import { PluginUiView } from "./mount";
import { Toasts, toast } from "./ui";
import "./console.css";

declare global {
  interface Window {
    React: typeof React;
    ReactDOM: typeof ReactDOM & typeof ReactDOMClient;
  }
}
window.React = React;
window.ReactDOM = { ...ReactDOM, ...ReactDOMClient };

/** The view a location hash names: `#/`, `#/plugins/<id>`, `#/plugins/<id>/ui`. */
type Route = { view: "plugins" } | { view: "plugin"; id: string } | { view: "ui"; id: string };

function route(hash: string): Route {
  const parts = hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "plugins" && parts[1]) {
    return parts[2] === "ui" ? { view: "ui", id: parts[1] } : { view: "plugin", id: parts[1] };
  }
  return { view: "plugins" };
}

function useRoute(): Route {
  const [current, setCurrent] = useState(() => route(window.location.hash));
  useEffect(() => {
    const changed = () => setCurrent(route(window.location.hash));
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  return current;
}

function App() {
  const [session, setSession] = useState<Session | null>(() => {
    const stored = storedSignIn();
    return stored ? makeSession(stored.token, stored.role) : null;
  });
  function makeSession(token: string, role: Role): Session {
    return {
      client: connect(token),
      role,
      signOut() {
        forgetSignIn();
        setSession(null);
      },
    };
  }
  if (!session) {
    return (
      <SignIn
        onSignedIn={(token, role) => setSession(makeSession(token, role))}
      />
    );
  }
  return <Frame session={session} />;
}

function Frame({ session }: { session: Session }) {
  const current = useRoute();
  return (
    <>
      <header className="bar">
        <a className="brand" href="#/">
          <img src="favicon.svg" alt="" width="22" height="22" />
          torud
        </a>
        <nav aria-label="Main">
          <a href="#/" aria-current={current.view === "plugins" ? "page" : undefined}>
            Plugins
          </a>
        </nav>
        <span className="role" data-testid="role">
          {session.role === "admin" ? "admin" : "read-only"}
        </span>
        <button type="button" className="quiet" onClick={session.signOut}>
          Sign out
        </button>
      </header>
      <main id="main">
        {current.view === "plugins" && <PluginsView session={session} />}
        {current.view === "plugin" && <PluginView key={current.id} session={session} id={current.id} />}
        {current.view === "ui" && <PluginUiView key={current.id} session={session} id={current.id} />}
      </main>
      <Toasts />
    </>
  );
}

function SignIn({ onSignedIn }: { onSignedIn: (token: string, role: Role) => void }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    document.title = "Sign in · torud";
  }, []);
  async function submit(e: React.FormEvent) {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const role = await signIn(token.trim());
      onSignedIn(token.trim(), role);
      toast(role === "admin" ? "Signed in" : "Signed in with a read token: read-only", "info");
    } catch (err) {
      setError(describe(err));
    } finally {
      setBusy(false);
    }
  }
  return (
    <main id="main" className="signin">
      <form onSubmit={submit} aria-labelledby="signin-title">
        <h1 id="signin-title">
          <img src="favicon.svg" alt="" width="28" height="28" /> torud
        </h1>
        <p>
          Sign in with the daemon's admin token or read token (<code>admin.token</code> or{" "}
          <code>read.token</code> in its data directory). It is kept in this tab only.
        </p>
        <label htmlFor="token">Token</label>
        <input
          id="token"
          name="token"
          type="password"
          autoComplete="off"
          autoFocus
          required
          value={token}
          onChange={(e) => setToken(e.target.value)}
        />
        {error && (
          <p className="error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" disabled={busy || !token.trim()}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}

ReactDOMClient.createRoot(document.getElementById("root")!).render(<App />);
