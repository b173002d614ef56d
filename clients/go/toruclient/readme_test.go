package toruclient_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// readmeBlock is the fenced block after <!-- readme-test: NAME --> in README.md.
func readmeBlock(t *testing.T, name string) string {
	text, err := os.ReadFile("../../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, after, ok := strings.Cut(string(text), "<!-- readme-test: "+name+" -->")
	if !ok {
		t.Fatalf("README.md has no readme-test: %s block", name)
	}
	_, body, _ := strings.Cut(strings.TrimLeft(after, "\n"), "\n")
	block, _, _ := strings.Cut(body, "\n```")
	return block
}

// TestReadmeExample runs the README's Go example as written (only the address and the data
// directory swapped for the test daemon's) as a program of its own module that uses this
// one through a replace directive.
func TestReadmeExample(t *testing.T) {
	code := strings.NewReplacer("127.0.0.1:50051", address, "target/example-data", dataDir).
		Replace(readmeBlock(t, "go"))
	module, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	gomod := "module readmeexample\n\ngo 1.24\n\nrequire github.com/toru-project/torud/clients/go v0.0.0\n\n" +
		"replace github.com/toru-project/torud/clients/go => " + module + "\n"
	sum, err := os.ReadFile(filepath.Join(module, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{"go.mod": gomod, "go.sum": string(sum), "main.go": code} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command("go", "run", "-mod=mod", ".")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := "hello PLUGIN_STATE_RUNNING\npy-echo PLUGIN_STATE_RUNNING\nv\n"
	if string(out) != want {
		t.Fatalf("printed %q, want %q", out, want)
	}
}
