package membership

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"testing"
	"time"
)

func TestEncryption(t *testing.T) {
	ctx := context.Background()
	key, err := DecodeSecretKey(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeSecretKey(base64.StdEncoding.EncodeToString([]byte("short"))); err == nil {
		t.Error("5-byte key accepted")
	}
	if _, err := DecodeSecretKey("not base64!"); err == nil {
		t.Error("bad base64 accepted")
	}
	withKey := func(name string, k []byte, join ...string) Config {
		cfg := testConfig(name, join...)
		cfg.SecretKey = k
		return cfg
	}
	if _, err := New(ctx, withKey("bad", []byte("0123456789")), NodeMeta{}); err == nil {
		t.Error("10-byte key accepted")
	}

	e1 := startAgent(t, withKey("e1", key), testMeta("e1"))
	e2 := startAgent(t, withKey("e2", key, e1.Addr()), testMeta("e2"))
	waitFor(t, 5*time.Second, "encrypted cluster formed", func() bool {
		return sees(e1, "e2", StateAlive, nil) && sees(e2, "e1", StateAlive, nil)
	})

	other := bytes.Repeat([]byte{9}, 32)
	for name, k := range map[string][]byte{"wrong-key": other, "no-key": nil} {
		_, err := New(ctx, withKey(name, k, e1.Addr()), testMeta("x1"))
		var je *JoinError
		if !errors.As(err, &je) {
			t.Fatalf("%s joined an encrypted cluster: %v", name, err)
		}
		t.Logf("%s refused: %v", name, err)
		if _, ok := e1.Member(name); ok {
			t.Fatalf("e1 lists %s", name)
		}
	}
	// An encrypted node cannot join a plaintext cluster either.
	p1 := startAgent(t, testConfig("p1"), testMeta("p1"))
	if _, err := New(ctx, withKey("k1", key, p1.Addr()), testMeta("k1")); err == nil {
		t.Fatal("encrypted node joined a plaintext cluster")
	}
}
