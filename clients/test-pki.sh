#!/usr/bin/env bash
# Writes a throw-away PKI for the clients' TLS tests into DIR: ca.pem, server.pem and
# server.key (for localhost), client.pem and client.key, all signed by the CA, valid 2 days.
set -euo pipefail
dir="$1"
mkdir -p "$dir"
cd "$dir"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca.key
openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj /CN=torud-test-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
for name in server client; do
  key "$name.key"
  cn=localhost
  [[ $name == client ]] && cn=client
  openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
  printf 'subjectAltName=DNS:%s\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=%s\n' \
    "$cn" "$([[ $name == server ]] && echo serverAuth || echo clientAuth)" >"$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile "$name.ext" -out "$name.pem" 2>/dev/null
done
rm -f ./*.csr ./*.ext ca.srl
