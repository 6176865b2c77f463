#!/usr/bin/env bash
# Rebuilds the seed corpus from the TPM fixtures (attestors/tests/fixtures/tpm): real TPM
# structures, and Hello/Evidence messages carrying them (encoded with protoc). Run after
# regenerating the fixtures; then seeds.py rebuilds the other targets' seeds. Corpus growth from
# fuzzing never lands here (see xtask/src/fuzz.rs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
fx="$here/../attestors/tests/fixtures/tpm"
proto="$here/../proto/proto"
corpus="$here/corpus"
rm -rf "$corpus"/{tpms_attest,tpmt_public,tpmt_signature,attestation_messages}
mkdir -p "$corpus"/{tpms_attest,tpmt_public,tpmt_signature,attestation_messages}

for q in quote_rsa quote_pss quote_ecc; do
    cp "$fx/$q.attest" "$corpus/tpms_attest/$q"
    cp "$fx/$q.sig" "$corpus/tpmt_signature/$q"
done
for p in ek_rsa ek_ecc ak_rsa ak_pss ak_ecc; do
    cp "$fx/$p.pub" "$corpus/tpmt_public/$p"
done

# Bytes as a protobuf text-format string literal.
bytes() { printf '"'; xxd -p "$1" | tr -d '\n' | sed 's/../\\x&/g'; printf '"'; }
pem_der() { sed '/-----/d' "$1" | base64 -d >"$2"; }
encode() { protoc --encode="tether.tpm.v1.$1" -I "$proto" -I /usr/include "$proto/tether/tpm.proto"; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pem_der "$fx/ca/intermediate.pem" "$tmp/intermediate.der"
for kind in rsa ecc; do
    {
        echo "ek_public: $(bytes "$fx/ek_$kind.pub")"
        echo "ek_certificate: $(bytes "$fx/ek_$kind.crt")"
        echo "ek_intermediates: $(bytes "$tmp/intermediate.der")"
        echo "ak_public: $(bytes "$fx/ak_$kind.pub")"
    } | encode Hello >"$corpus/attestation_messages/hello_$kind"
done
{
    echo "quote: $(bytes "$fx/quote_rsa.attest")"
    echo "signature: $(bytes "$fx/quote_rsa.sig")"
    while IFS= read -r line; do
        bank=${line%%:*} rest=${line#*:}
        index=${rest%%=*} value=${rest#*=}
        printf '%s' "$value" | xxd -r -p >"$tmp/value"
        echo "pcr_values { bank: \"$bank\" index: $index value: $(bytes "$tmp/value") }"
    done <"$fx/quote_rsa.pcrs"
} | encode Evidence >"$corpus/attestation_messages/evidence_rsa"
# node_api's seeds carry these messages.
python3 "$here/seeds.py"
du -sh "$corpus"
