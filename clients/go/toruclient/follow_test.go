package toruclient_test

// The resuming followers (FollowEvents, FollowLogs): against fake servers, that UNAVAILABLE
// resumes from the last seq or cursors returned while other codes are returned at once;
// and against the real daemon, that they survive a cold restart (SIGTERM, then a new
// daemon on the same port and data directory) with no duplicate and nothing lost. Waits
// use deadlines, never sleeps.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/toru-project/torud/clients/go/toruclient"
	torupb "github.com/toru-project/torud/clients/go/torupb/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

const upgrading = "the daemon is upgrading"

type script[T any] struct {
	messages []*T
	code     codes.Code
}

// play sends the next script's messages, then ends with its status.
func play[T any](mu *sync.Mutex, calls *int, scripts []script[T], send func(*T) error) error {
	mu.Lock()
	*calls++
	s := scripts[min(*calls, len(scripts))-1]
	mu.Unlock()
	for _, m := range s.messages {
		if err := send(m); err != nil {
			return err
		}
	}
	message := "refused"
	if s.code == codes.Unavailable {
		message = upgrading
	}
	return status.Error(s.code, message)
}

type fakePlugins struct {
	torupb.UnimplementedPluginServiceServer
	mu       sync.Mutex
	calls    int
	scripts  []script[torupb.WatchEventsResponse]
	requests []*torupb.WatchEventsRequest
}

func (f *fakePlugins) WatchEvents(req *torupb.WatchEventsRequest, s grpc.ServerStreamingServer[torupb.WatchEventsResponse]) error {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	f.mu.Unlock()
	return play(&f.mu, &f.calls, f.scripts, s.Send)
}

type fakeLogs struct {
	torupb.UnimplementedLogServiceServer
	mu       sync.Mutex
	calls    int
	scripts  []script[torupb.StreamLogsResponse]
	requests []*torupb.StreamLogsRequest
}

func (f *fakeLogs) StreamLogs(req *torupb.StreamLogsRequest, s grpc.ServerStreamingServer[torupb.StreamLogsResponse]) error {
	f.mu.Lock()
	f.requests = append(f.requests, req)
	f.mu.Unlock()
	return play(&f.mu, &f.calls, f.scripts, s.Send)
}

func fakeServer(t *testing.T, plugins *fakePlugins, logs *fakeLogs) *toruclient.Client {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	if plugins != nil {
		torupb.RegisterPluginServiceServer(server, plugins)
	}
	if logs != nil {
		torupb.RegisterLogServiceServer(server, logs)
	}
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)
	c, err := toruclient.Connect(toruclient.Options{Address: listener.Addr().String(), Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func event(seq uint64) *torupb.WatchEventsResponse {
	return &torupb.WatchEventsResponse{Event: &torupb.Event{Seq: seq, PluginId: "p"}}
}

func record(plugin string, seq uint64) *torupb.LogRecord {
	return &torupb.LogRecord{PluginId: plugin, Seq: seq, Cursor: fmt.Sprintf("%s:%d", plugin, seq)}
}

// drain receives until an error, with the test's deadline in ctx.
func drain[T any](f *toruclient.Follower[T]) ([]*T, error) {
	var items []*T
	for {
		item, err := f.Recv()
		if err != nil {
			return items, err
		}
		items = append(items, item)
	}
}

func TestFollowEventsReturnsOtherCodesAtOnce(t *testing.T) {
	fake := &fakePlugins{scripts: []script[torupb.WatchEventsResponse]{{nil, codes.PermissionDenied}}}
	c := fakeServer(t, fake, nil)
	started := time.Now()
	items, err := drain(c.FollowEvents(ctx(t), &torupb.WatchEventsRequest{AfterSeq: proto.Uint64(0)}, toruclient.FollowOptions{}))
	if status.Code(err) != codes.PermissionDenied || len(items) != 0 {
		t.Fatalf("got %v, %v", items, err)
	}
	if len(fake.requests) != 1 || time.Since(started) > 5*time.Second {
		t.Fatalf("%d requests in %v", len(fake.requests), time.Since(started))
	}
}

func TestFollowEventsResumesAfterUnavailable(t *testing.T) {
	gap := &torupb.WatchEventsResponse{Gap: &torupb.EventGap{FirstSeq: 3, LastSeq: 4}}
	fake := &fakePlugins{scripts: []script[torupb.WatchEventsResponse]{
		{[]*torupb.WatchEventsResponse{event(1), event(2)}, codes.Unavailable},
		{[]*torupb.WatchEventsResponse{event(2), gap, event(5)}, codes.InvalidArgument},
	}}
	c := fakeServer(t, fake, nil)
	items, err := drain(c.FollowEvents(ctx(t), &torupb.WatchEventsRequest{AfterSeq: proto.Uint64(0), PluginIds: []string{"p"}}, toruclient.FollowOptions{}))
	if status.Code(err) != codes.InvalidArgument {
		t.Fatal(err)
	}
	var got []string
	for _, r := range items {
		if r.Gap != nil {
			got = append(got, fmt.Sprintf("gap %d", r.Gap.LastSeq))
		} else {
			got = append(got, fmt.Sprint(r.Event.Seq))
		}
	}
	if want := []string{"1", "2", "gap 4", "5"}; !slices.Equal(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	if len(fake.requests) != 2 || fake.requests[0].GetAfterSeq() != 0 || fake.requests[1].GetAfterSeq() != 2 ||
		!slices.Equal(fake.requests[1].PluginIds, []string{"p"}) {
		t.Fatalf("requests %v", fake.requests)
	}
}

func TestFollowEventsGivesUpAfterTheWindow(t *testing.T) {
	fake := &fakePlugins{scripts: []script[torupb.WatchEventsResponse]{{nil, codes.Unavailable}}}
	c := fakeServer(t, fake, nil)
	started := time.Now()
	_, err := drain(c.FollowEvents(ctx(t), nil, toruclient.FollowOptions{ReconnectWindow: 500 * time.Millisecond}))
	if status.Code(err) != codes.Unavailable || !strings.HasPrefix(status.Convert(err).Message(), upgrading) {
		t.Fatal(err)
	}
	if elapsed := time.Since(started); elapsed < 500*time.Millisecond || elapsed > 5*time.Second || len(fake.requests) <= 2 {
		t.Fatalf("%d requests in %v", len(fake.requests), elapsed)
	}
	if fake.requests[0].AfterSeq != nil {
		t.Fatal("a follower without after_seq sent one")
	}
}

func TestFollowLogsResumesWithPerPluginCursors(t *testing.T) {
	fake := &fakeLogs{scripts: []script[torupb.StreamLogsResponse]{
		{[]*torupb.StreamLogsResponse{{Records: []*torupb.LogRecord{record("a", 1), record("a", 2), record("b", 7)}}}, codes.Unavailable},
		{[]*torupb.StreamLogsResponse{{
			Gap:     &torupb.LogGap{PluginId: "b", FromSeq: 8, ToSeq: 9},
			Records: []*torupb.LogRecord{record("a", 2), record("a", 3), record("b", 10)},
		}}, codes.Unavailable},
		{nil, codes.PermissionDenied},
	}}
	c := fakeServer(t, nil, fake)
	items, err := drain(c.FollowLogs(ctx(t), &torupb.StreamLogsRequest{
		Filter: &torupb.LogFilter{MinLevel: torupb.LogLevel_LOG_LEVEL_INFO},
		Start:  &torupb.StreamLogsRequest_AfterCursors{AfterCursors: &torupb.Cursors{Cursors: []string{"c:3"}}},
	}, toruclient.FollowOptions{}))
	if status.Code(err) != codes.PermissionDenied {
		t.Fatal(err)
	}
	var got [][]string
	for _, b := range items {
		var cursors []string
		for _, r := range b.Records {
			cursors = append(cursors, r.Cursor)
		}
		got = append(got, cursors)
	}
	if fmt.Sprint(got) != "[[a:1 a:2 b:7] [a:3 b:10]]" || items[1].GetGap().GetToSeq() != 9 {
		t.Fatalf("got %v (gap %v)", got, items[1].GetGap())
	}
	var sent []string
	for _, r := range fake.requests {
		cursors := slices.Clone(r.GetAfterCursors().GetCursors())
		slices.Sort(cursors)
		sent = append(sent, fmt.Sprint(cursors))
		if !r.Follow || r.GetFilter().GetMinLevel() != torupb.LogLevel_LOG_LEVEL_INFO {
			t.Fatalf("request %v", r)
		}
	}
	if want := []string{"[c:3]", "[a:2 b:7 c:3]", "[a:3 b:10 c:3]"}; !slices.Equal(sent, want) {
		t.Fatalf("sent %v, want %v", sent, want)
	}
}

// restartable is torud with the chatty plugin (clients/chatty-plugin.py) on a fixed port
// and data directory.
type restartable struct {
	dir, address, plugins, dataDir string
	cmd                            *exec.Cmd
}

func (d *restartable) start() error {
	torud := os.Getenv("TORUD_BIN")
	if torud == "" {
		root, _ := filepath.Abs("../../..")
		torud = filepath.Join(root, "target", "debug", "torud")
	}
	stderr, err := os.OpenFile(filepath.Join(d.dir, "daemon.stderr"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer stderr.Close()
	cmd := exec.Command(torud, "serve", "--listen", d.address, "--plugins-dir", d.plugins,
		"--data-dir", d.dataDir, "--enable-new-plugins")
	cmd.Stderr = stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	d.cmd = cmd
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- line
		_, _ = io.Copy(io.Discard, r)
	}()
	select {
	case line := <-lines:
		if want := "torud listening on " + d.address; strings.TrimSpace(line) != want {
			return fmt.Errorf("first line %q, want %q", line, want)
		}
		return nil
	case <-time.After(20 * time.Second):
		return fmt.Errorf("torud did not report listening within 20 s")
	}
}

func (d *restartable) stop() {
	if d.cmd != nil {
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		_ = d.cmd.Wait()
		d.cmd = nil
	}
}

// collector receives from a follower on a goroutine; wait checks a condition on what it
// received so far each time something arrives, until a deadline.
type collector[T any] struct {
	mu    sync.Mutex
	items []*T
	err   error
	wake  chan struct{}
}

func collect[T any](f *toruclient.Follower[T]) *collector[T] {
	c := &collector[T]{wake: make(chan struct{}, 1)}
	go func() {
		for {
			item, err := f.Recv()
			c.mu.Lock()
			if err != nil {
				c.err = err
			} else {
				c.items = append(c.items, item)
			}
			c.mu.Unlock()
			select {
			case c.wake <- struct{}{}:
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	return c
}

func (c *collector[T]) snapshot() []*T {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.items)
}

func (c *collector[T]) wait(t *testing.T, what string, ok func([]*T) bool) {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		c.mu.Lock()
		done, err, n := ok(c.items), c.err, len(c.items)
		c.mu.Unlock()
		if done {
			return
		}
		if err != nil {
			t.Fatalf("waiting for %s: the follower failed: %v", what, err)
		}
		select {
		case <-c.wake:
		case <-deadline:
			t.Fatalf("timed out waiting for %s with %d items", what, n)
		}
	}
}

func TestFollowersSurviveADaemonRestart(t *testing.T) {
	root, _ := filepath.Abs("../../..")
	dir, err := os.MkdirTemp("", "torud-go-follow-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	// Run as root, torud runs each plugin under its own uid, which must reach its executable.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &restartable{dir: dir, address: listener.Addr().String(), plugins: filepath.Join(dir, "plugins"), dataDir: filepath.Join(dir, "data")}
	_ = listener.Close()
	if err := os.Mkdir(d.plugins, 0o755); err != nil {
		t.Fatal(err)
	}
	wrapper := fmt.Sprintf("#!/bin/sh\nexec python3 %q \"$@\"\n", filepath.Join(root, "clients", "chatty-plugin.py"))
	if err := os.WriteFile(filepath.Join(d.plugins, "chatty.binary"), []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := d.start(); err != nil {
		t.Fatal(err)
	}
	defer d.stop()
	c, err := toruclient.Connect(toruclient.Options{Address: d.address, DataDir: d.dataDir})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	follow, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	events := collect(c.FollowEvents(follow, &torupb.WatchEventsRequest{AfterSeq: proto.Uint64(0)}, toruclient.FollowOptions{}))
	logs := collect(c.FollowLogs(follow, &torupb.StreamLogsRequest{
		Filter: &torupb.LogFilter{PluginIds: []string{"chatty"}},
		Start:  &torupb.StreamLogsRequest_Tail{Tail: 5},
	}, toruclient.FollowOptions{}))
	running := func(after uint64) func([]*torupb.WatchEventsResponse) bool {
		return func(items []*torupb.WatchEventsResponse) bool {
			return slices.ContainsFunc(items, func(r *torupb.WatchEventsResponse) bool {
				return r.GetEvent().GetSeq() > after && r.GetEvent().GetPluginId() == "chatty" &&
					r.GetEvent().GetToState() == torupb.PluginState_PLUGIN_STATE_RUNNING
			})
		}
	}
	count := func(batches []*torupb.StreamLogsResponse, ok func(*torupb.LogRecord) bool) int {
		n := 0
		for _, b := range batches {
			for _, r := range b.Records {
				if ok(r) {
					n++
				}
			}
		}
		return n
	}
	events.wait(t, "chatty running", running(0))
	logs.wait(t, "20 records", func(b []*torupb.StreamLogsResponse) bool {
		return count(b, func(*torupb.LogRecord) bool { return true }) >= 20
	})

	d.stop()
	var before uint64
	for _, r := range events.snapshot() {
		before = max(before, r.GetEvent().GetSeq())
	}
	oldPids := map[uint32]bool{}
	for _, b := range logs.snapshot() {
		for _, r := range b.Records {
			oldPids[r.Pid] = true
		}
	}
	if err := d.start(); err != nil {
		t.Fatal(err)
	}
	// Events after the restart arrive: chatty runs again.
	events.wait(t, "chatty running again", running(before))
	// And its new run's lines arrive, after everything the old one wrote.
	logs.wait(t, "the new run's lines", func(b []*torupb.StreamLogsResponse) bool {
		return count(b, func(r *torupb.LogRecord) bool { return !oldPids[r.Pid] && strings.HasPrefix(r.Message, "tick") }) >= 5
	})

	var seqs []uint64
	for _, r := range events.snapshot() {
		if r.Gap != nil {
			t.Fatalf("unexpected gap %v", r.Gap)
		}
		seqs = append(seqs, r.Event.Seq)
	}
	if !slices.IsSorted(seqs) || len(slices.Compact(slices.Clone(seqs))) != len(seqs) {
		t.Fatalf("event seqs not strictly increasing: %v", seqs)
	}
	seqs = nil
	for _, b := range logs.snapshot() {
		if b.Gap != nil {
			t.Fatalf("unexpected gap %v", b.Gap)
		}
		for _, r := range b.Records {
			seqs = append(seqs, r.Seq)
		}
	}
	// Strictly increasing and contiguous: no duplicate, nothing lost across the restart.
	for i, s := range seqs {
		if s != seqs[0]+uint64(i) {
			t.Fatalf("record seqs have a gap or duplicate at %d: %v", i, seqs)
		}
	}
}
