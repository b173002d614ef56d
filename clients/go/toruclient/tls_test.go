package toruclient_test

import (
	"bufio"
	"context"
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
)

// TestTLSWithClientCertificate runs a second daemon serving TLS and requiring client
// certificates (a throw-away PKI from clients/test-pki.sh).
func TestTLSWithClientCertificate(t *testing.T) {
	root, _ := filepath.Abs("../../..")
	target := os.Getenv("CARGO_TARGET_DIR")
	if target == "" {
		target = filepath.Join(root, "target")
	}
	// Not t.TempDir(): its parent is 0700, and run as root, torud runs each plugin under its
	// own uid, which must reach its executable.
	dir, err := os.MkdirTemp("", "torud-go-tls-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	pki := filepath.Join(dir, "pki")
	if out, err := exec.Command("bash", filepath.Join(root, "clients", "test-pki.sh"), pki).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	plugins := filepath.Join(dir, "plugins")
	if err := os.Mkdir(plugins, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := copyFile(filepath.Join(target, "debug", "examples", "hello-plugin"), filepath.Join(plugins, "hello.binary")); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(target, "debug", "torud"), "serve", "--listen", "127.0.0.1:0",
		"--plugins-dir", plugins, "--data-dir", filepath.Join(dir, "data"), "--enable-new-plugins",
		"--tls-cert", filepath.Join(pki, "server.pem"), "--tls-key", filepath.Join(pki, "server.key"),
		"--tls-client-ca", filepath.Join(pki, "ca.pem"))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- line
		_, _ = r.WriteTo(io.Discard)
	}()
	var addr string
	select {
	case line := <-lines:
		addr = strings.TrimSpace(strings.TrimPrefix(line, "torud listening on "))
	case <-time.After(20 * time.Second):
		t.Fatal("torud did not report listening within 20 s")
	}
	port := addr[strings.LastIndex(addr, ":")+1:]
	options := toruclient.Options{
		Address: "https://localhost:" + port, DataDir: filepath.Join(dir, "data"),
		TLSCA: filepath.Join(pki, "ca.pem"), TLSCert: filepath.Join(pki, "client.pem"), TLSKey: filepath.Join(pki, "client.key"),
	}
	c, err := toruclient.Connect(options)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	events, err := c.Plugins.WatchEvents(ctx, &torupb.WatchEventsRequest{AfterSeq: new(uint64), PluginIds: []string{"hello"}})
	if err != nil {
		t.Fatal(err)
	}
	for {
		r, err := events.Recv()
		if err != nil {
			t.Fatalf("over TLS: %v", err)
		}
		if r.Event.ToState == torupb.PluginState_PLUGIN_STATE_RUNNING {
			break
		}
	}

	options.TLSCert, options.TLSKey = "", ""
	anonymous, err := toruclient.Connect(options)
	if err != nil {
		t.Fatal(err)
	}
	defer anonymous.Close()
	if _, err := anonymous.Plugins.ListPlugins(ctx, &torupb.ListPluginsRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("without a client certificate: %v", err)
	}
}
