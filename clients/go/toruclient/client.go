// Package toruclient connects to torud's gRPC control plane: by address and bearer token,
// by its Unix control socket, or by its data directory. The service clients and messages
// are generated from proto/toru/v1 into package torupb by clients/generate.sh.
package toruclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	torupb "github.com/toru-project/torud/clients/go/torupb/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// DefaultAddress is used when no address, socket or data directory says otherwise.
const DefaultAddress = "127.0.0.1:50051"

// Options say where the daemon is and how to authenticate. Empty fields fall back to
// TORUD_ADDR, TORUD_TOKEN and TORUD_DATA_DIR.
type Options struct {
	// Address is host:port, or https://host:port for TLS.
	Address string
	// Token is the bearer token (admin or read-only).
	Token string
	// UnixSocket is the daemon's control socket (no token needed).
	UnixSocket string
	// DataDir is the daemon's data directory: its torud.sock when it exists (and no
	// Address is given), otherwise its admin.token.
	DataDir string
	// TLSCA is, for https:// addresses, the PEM file of the CA that signed the daemon's
	// certificate; empty means the system's roots.
	TLSCA string
	// TLSCert and TLSKey are, for https:// addresses, PEM files of a client certificate
	// and its key, for daemons that require one.
	TLSCert, TLSKey string
}

// Client holds the service clients, sharing one connection.
type Client struct {
	Conn    *grpc.ClientConn
	Plugins torupb.PluginServiceClient
	KV      torupb.KvServiceClient
	Logs    torupb.LogServiceClient
	Config  torupb.ConfigServiceClient
}

// Close closes the connection.
func (c *Client) Close() error { return c.Conn.Close() }

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: the daemon speaks plaintext on loopback and its socket.
func (bearer) RequireTransportSecurity() bool { return false }

// Connect opens a client (the connection is made lazily, on the first call).
func Connect(o Options) (*Client, error) {
	if o.Address == "" {
		o.Address = os.Getenv("TORUD_ADDR")
	}
	if o.Token == "" {
		o.Token = os.Getenv("TORUD_TOKEN")
	}
	if o.DataDir == "" {
		o.DataDir = os.Getenv("TORUD_DATA_DIR")
	}
	target := o.Address
	switch {
	case o.UnixSocket != "":
		target = "unix:" + o.UnixSocket
	case o.Address == "" && o.DataDir != "" && exists(filepath.Join(o.DataDir, "torud.sock")):
		target = "unix:" + filepath.Join(o.DataDir, "torud.sock")
	default:
		if target == "" {
			target = DefaultAddress
		}
		if o.Token == "" && o.DataDir != "" {
			text, err := os.ReadFile(filepath.Join(o.DataDir, "admin.token"))
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, err
			}
			o.Token = strings.TrimSpace(string(text))
		}
	}
	transport := insecure.NewCredentials()
	if rest, ok := strings.CutPrefix(target, "https://"); ok {
		target = rest
		config, err := tlsConfig(o)
		if err != nil {
			return nil, err
		}
		transport = credentials.NewTLS(config)
	} else {
		target = strings.TrimPrefix(target, "http://")
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(transport)}
	if o.Token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(o.Token)))
	}
	conn, err := grpc.NewClient(target, opts...)
	if err != nil {
		return nil, err
	}
	return &Client{
		Conn:    conn,
		Plugins: torupb.NewPluginServiceClient(conn),
		KV:      torupb.NewKvServiceClient(conn),
		Logs:    torupb.NewLogServiceClient(conn),
		Config:  torupb.NewConfigServiceClient(conn),
	}, nil
}

func tlsConfig(o Options) (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.TLSCA != "" {
		pem, err := os.ReadFile(o.TLSCA)
		if err != nil {
			return nil, err
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", o.TLSCA)
		}
	}
	if (o.TLSCert == "") != (o.TLSKey == "") {
		return nil, errors.New("TLSCert and TLSKey go together")
	}
	if o.TLSCert != "" {
		pair, err := tls.LoadX509KeyPair(o.TLSCert, o.TLSKey)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
