package toruclient_test

// The generated Go client against the real daemon (started by TestMain with the Rust
// "hello" and Python "py-echo" example plugins): lifecycle, KV, calls, log queries, log
// streams resumed from a cursor, and lifecycle events. Waits use deadlines, never sleeps.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/toru-project/torud/clients/go/toruclient"
	torupb "github.com/toru-project/torud/clients/go/torupb/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

var (
	address string
	dataDir string
	client  *toruclient.Client
)

func TestMain(m *testing.M) {
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "setup:", err)
		os.Exit(1)
	}
	os.Exit(code)
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, data, 0o755)
}

func run(m *testing.M) (int, error) {
	root, _ := filepath.Abs("../../..")
	target := os.Getenv("CARGO_TARGET_DIR")
	if target == "" {
		target = filepath.Join(root, "target")
	}
	torud := os.Getenv("TORUD_BIN")
	if torud == "" {
		torud = filepath.Join(target, "debug", "torud")
	}
	dir, err := os.MkdirTemp("", "torud-go-")
	if err != nil {
		return 0, err
	}
	// Run as root, torud runs each plugin under its own uid, which must reach its executable.
	if err := os.Chmod(dir, 0o755); err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	plugins := filepath.Join(dir, "plugins")
	dataDir = filepath.Join(dir, "data")
	if err := os.Mkdir(plugins, 0o755); err != nil {
		return 0, err
	}
	if err := copyFile(filepath.Join(target, "debug", "examples", "hello-plugin"), filepath.Join(plugins, "hello.binary")); err != nil {
		return 0, fmt.Errorf("%w (run `cargo build --bins --examples`)", err)
	}
	// A wrapper runs the example in place, where it finds whatever it imports.
	wrapper := fmt.Sprintf("#!/bin/sh\nexec python3 %q \"$@\"\n", filepath.Join(root, "examples", "python", "py-echo.binary"))
	if err := os.WriteFile(filepath.Join(plugins, "py-echo.binary"), []byte(wrapper), 0o755); err != nil {
		return 0, err
	}
	stderr, err := os.Create(filepath.Join(dir, "daemon.stderr"))
	if err != nil {
		return 0, err
	}
	defer stderr.Close()
	cmd := exec.Command(torud, "serve", "--listen", "127.0.0.1:0", "--plugins-dir", plugins,
		"--data-dir", dataDir, "--enable-new-plugins")
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, err
	}
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- line
		_, _ = io.Copy(io.Discard, r)
	}()
	select {
	case line := <-lines:
		if !strings.HasPrefix(line, "torud listening on ") {
			return 0, fmt.Errorf("unexpected first line %q", line)
		}
		address = strings.TrimSpace(strings.TrimPrefix(line, "torud listening on "))
	case <-time.After(20 * time.Second):
		return 0, fmt.Errorf("torud did not report listening within 20 s")
	}
	client, err = toruclient.Connect(toruclient.Options{Address: address, DataDir: dataDir})
	if err != nil {
		return 0, err
	}
	defer client.Close()
	if err := waitRunning("hello", "py-echo"); err != nil {
		return 0, err
	}
	return m.Run(), nil
}

func waitRunning(ids ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := client.Plugins.WatchEvents(ctx, &torupb.WatchEventsRequest{AfterSeq: proto.Uint64(0)})
	if err != nil {
		return err
	}
	missing := map[string]bool{}
	for _, id := range ids {
		missing[id] = true
	}
	for len(missing) > 0 {
		r, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("waiting for %v to run: %w", missing, err)
		}
		if r.Event.ToState == torupb.PluginState_PLUGIN_STATE_RUNNING {
			delete(missing, r.Event.PluginId)
		}
	}
	return nil
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestListPlugins(t *testing.T) {
	r, err := client.Plugins.ListPlugins(ctx(t), &torupb.ListPluginsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range r.Plugins {
		ids = append(ids, p.Id)
	}
	if strings.Join(ids, ",") != "hello,py-echo" {
		t.Fatalf("plugins %v", ids)
	}
	if p := r.Plugins[0]; p.State != torupb.PluginState_PLUGIN_STATE_RUNNING || p.Pid == 0 || !p.Healthy {
		t.Fatalf("hello: %v", p)
	}
}

func TestDisableAndEnable(t *testing.T) {
	off, err := client.Plugins.DisablePlugin(ctx(t), &torupb.DisablePluginRequest{PluginId: "hello"})
	if err != nil || off.Plugin.State != torupb.PluginState_PLUGIN_STATE_STOPPED || off.Plugin.Enabled {
		t.Fatalf("disable: %v %v", off, err)
	}
	on, err := client.Plugins.EnablePlugin(ctx(t), &torupb.EnablePluginRequest{PluginId: "hello"})
	if err != nil || on.Plugin.State != torupb.PluginState_PLUGIN_STATE_RUNNING || on.Plugin.Pid == 0 {
		t.Fatalf("enable: %v %v", on, err)
	}
}

func TestUnknownPluginIsNotFound(t *testing.T) {
	_, err := client.Plugins.GetPlugin(ctx(t), &torupb.GetPluginRequest{PluginId: "nope"})
	if status.Code(err) != codes.NotFound || !strings.Contains(status.Convert(err).Message(), "nope") {
		t.Fatalf("got %v", err)
	}
}

func TestKVRoundTrip(t *testing.T) {
	c := ctx(t)
	if _, err := client.KV.SetValue(c, &torupb.SetValueRequest{PluginId: "hello", Key: "color", Value: "blue"}); err != nil {
		t.Fatal(err)
	}
	got, err := client.KV.GetValue(c, &torupb.GetValueRequest{PluginId: "hello", Key: "color"})
	if err != nil || !got.Found || got.Value != "blue" {
		t.Fatalf("get: %v %v", got, err)
	}
	if _, err := client.KV.DeleteValue(c, &torupb.DeleteValueRequest{PluginId: "hello", Key: "color"}); err != nil {
		t.Fatal(err)
	}
	got, err = client.KV.GetValue(c, &torupb.GetValueRequest{PluginId: "hello", Key: "color"})
	if err != nil || got.Found {
		t.Fatalf("get after delete: %v %v", got, err)
	}
}

func TestCall(t *testing.T) {
	r, err := client.Plugins.CallPlugin(ctx(t), &torupb.CallPluginRequest{
		PluginId: "py-echo", Method: "POST", Path: "/echo?x=1",
		Headers: []*torupb.Header{{Name: "content-type", Value: "text/plain"}},
		Body:    []byte("hello"),
	})
	if err != nil || r.Status != 200 {
		t.Fatalf("call: %v %v", r, err)
	}
	var body map[string]any
	if err := json.Unmarshal(r.Body, &body); err != nil {
		t.Fatal(err)
	}
	if body["method"] != "POST" || body["path"] != "/echo?x=1" || body["body"] != "hello" {
		t.Fatalf("body %v", body)
	}
}

func TestQueryLogs(t *testing.T) {
	req := &torupb.QueryLogsRequest{Filter: &torupb.LogFilter{PluginIds: []string{"py-echo"}}, PageSize: 2}
	var records []*torupb.LogRecord
	pages := 0
	for {
		page, err := client.Logs.QueryLogs(ctx(t), req)
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Records) > 2 {
			t.Fatalf("page of %d", len(page.Records))
		}
		records = append(records, page.Records...)
		pages++
		if page.NextPageToken == "" {
			break
		}
		req.PageToken = page.NextPageToken
	}
	found := false
	for i, r := range records {
		if i > 0 && r.Seq <= records[i-1].Seq {
			t.Fatalf("out of order: %v", records)
		}
		found = found || (r.Message == "running: ready" && r.Stream == torupb.LogStream_LOG_STREAM_SUPERVISOR)
	}
	if pages < 2 || !found {
		t.Fatalf("%d pages, ready note found: %v", pages, found)
	}
}

func TestFollowLogsThenResumeFromCursor(t *testing.T) {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	filter := &torupb.LogFilter{PluginIds: []string{"hello"}}
	follow, err := client.Logs.StreamLogs(c, &torupb.StreamLogsRequest{
		Filter: filter, Start: &torupb.StreamLogsRequest_Tail{Tail: 1}, Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	batch, err := follow.Recv()
	if err != nil {
		t.Fatal(err)
	}
	first := batch.Records[0]
	if _, err := client.Plugins.RestartPlugin(ctx(t), &torupb.RestartPluginRequest{PluginId: "hello"}); err != nil {
		t.Fatal(err)
	}
	var followed []*torupb.LogRecord
	for done := false; !done; {
		b, err := follow.Recv()
		if err != nil {
			t.Fatalf("follow: %v after %v", err, followed)
		}
		for _, r := range b.Records {
			followed = append(followed, r)
			done = done || r.Message == "running: ready"
		}
	}
	for i, r := range followed {
		if r.Seq != first.Seq+1+uint64(i) {
			t.Fatalf("gap or duplicate at %d: %v", i, followed)
		}
	}

	resumed, err := client.Logs.StreamLogs(ctx(t), &torupb.StreamLogsRequest{
		Filter: filter, Start: &torupb.StreamLogsRequest_AfterCursors{AfterCursors: &torupb.Cursors{Cursors: []string{first.Cursor}}}})
	if err != nil {
		t.Fatal(err)
	}
	var again []*torupb.LogRecord
	for {
		b, err := resumed.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		again = append(again, b.Records...)
	}
	if len(again) < len(followed) {
		t.Fatalf("resumed %d records, followed %d", len(again), len(followed))
	}
	for i, r := range followed {
		if again[i].Cursor != r.Cursor {
			t.Fatalf("record %d: resumed %s, followed %s", i, again[i].Cursor, r.Cursor)
		}
	}
}

func TestWatchEvents(t *testing.T) {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	events, err := client.Plugins.WatchEvents(c, &torupb.WatchEventsRequest{
		AfterSeq: proto.Uint64(0), PluginIds: []string{"py-echo"}})
	if err != nil {
		t.Fatal(err)
	}
	var last uint64
	for last == 0 {
		r, err := events.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.Event.ToState == torupb.PluginState_PLUGIN_STATE_RUNNING {
			last = r.Event.Seq
		}
	}
	if _, err := client.Plugins.RestartPlugin(ctx(t), &torupb.RestartPluginRequest{PluginId: "py-echo"}); err != nil {
		t.Fatal(err)
	}
	var changes []*torupb.Event
	for {
		r, err := events.Recv()
		if err != nil {
			t.Fatalf("%v after %v", err, changes)
		}
		e := r.Event
		if e.PluginId != "py-echo" {
			t.Fatalf("event about %q", e.PluginId)
		}
		if e.Seq > last && e.Kind == torupb.EventKind_EVENT_KIND_STATE_CHANGED {
			changes = append(changes, e)
			if e.ToState == torupb.PluginState_PLUGIN_STATE_RUNNING {
				break
			}
		}
	}
	if changes[0].FromState != torupb.PluginState_PLUGIN_STATE_RUNNING || changes[0].ToState != torupb.PluginState_PLUGIN_STATE_STOPPING {
		t.Fatalf("first change %v", changes[0])
	}
}

func TestConnectByDataDirUsesTheControlSocket(t *testing.T) {
	local, err := toruclient.Connect(toruclient.Options{DataDir: dataDir})
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	if target := local.Conn.Target(); !strings.HasPrefix(target, "unix:") {
		t.Fatalf("target %q", target)
	}
	r, err := local.Plugins.ListPlugins(ctx(t), &torupb.ListPluginsRequest{})
	if err != nil || len(r.Plugins) != 2 {
		t.Fatalf("list: %v %v", r, err)
	}
}

func TestTokensOverTCP(t *testing.T) {
	t.Setenv("TORUD_TOKEN", "")
	t.Setenv("TORUD_DATA_DIR", "")
	anonymous, err := toruclient.Connect(toruclient.Options{Address: address})
	if err != nil {
		t.Fatal(err)
	}
	defer anonymous.Close()
	if _, err := anonymous.Plugins.ListPlugins(ctx(t), &torupb.ListPluginsRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("without a token: %v", err)
	}
	token, err := os.ReadFile(filepath.Join(dataDir, "read.token"))
	if err != nil {
		t.Fatal(err)
	}
	reader, err := toruclient.Connect(toruclient.Options{Address: address, Token: strings.TrimSpace(string(token))})
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	if _, err := reader.Plugins.ListPlugins(ctx(t), &torupb.ListPluginsRequest{}); err != nil {
		t.Fatalf("read token, list: %v", err)
	}
	_, err = reader.KV.SetValue(ctx(t), &torupb.SetValueRequest{PluginId: "hello", Key: "k", Value: "v"})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("read token, set: %v", err)
	}
}
