package integration

import (
	"bytes"
	"context"
	"errors"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/peer"
	"github.com/ukai-storage/ukai/cluster/tlsutil"
)

// imageRef returns an image's id and generation as its info reports them.
func imageRef(t *testing.T, n *node, image string) peer.Ref {
	t.Helper()
	m := n.imageJSON(image, false)
	id, _ := m["id"].(string)
	gen, _ := m["generation"].(float64)
	if len(id) != 32 || gen < 1 {
		t.Fatalf("image %s: id %q generation %v", image, id, m["generation"])
	}
	return peer.Ref{ID: id, Gen: uint64(gen)}
}

// forgedWritesRefused sends writes, unmaps, flushes and fences to the
// copy at addr with made-up generations through c and checks that each is
// refused and the copy still holds want at offset 0.
func forgedWritesRefused(t *testing.T, c *peer.Client, ref peer.Ref, want []byte, sameGenRefused bool) {
	t.Helper()
	ctx := context.Background()
	junk := bytes.Repeat([]byte{0xee}, len(want))
	gens := []uint64{math.MaxUint64, ref.Gen + 1}
	if sameGenRefused {
		gens = append(gens, ref.Gen)
	}
	for _, g := range gens {
		r := peer.Ref{ID: ref.ID, Gen: g, Epoch: math.MaxUint64}
		if err := c.WriteAt(ctx, r, junk, 0, true); !errors.Is(err, peer.ErrForbidden) {
			t.Errorf("write with generation %d: %v, want refused (%v)", g, err, peer.ErrForbidden)
		}
		if err := c.Unmap(ctx, r, 0, int64(len(want))); !errors.Is(err, peer.ErrForbidden) {
			t.Errorf("unmap with generation %d: %v, want refused", g, err)
		}
		if err := c.Fence(ctx, r); !errors.Is(err, peer.ErrForbidden) {
			t.Errorf("fence with generation %d: %v, want refused", g, err)
		}
		if err := c.Sync(ctx, r); !errors.Is(err, peer.ErrForbidden) {
			t.Errorf("sync with generation %d: %v, want refused", g, err)
		}
	}
	got := make([]byte, len(want))
	if err := c.ReadAt(ctx, ref, got, 0); err != nil {
		t.Fatalf("read the copy back: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("a refused write changed the copy")
	}
}

// A process on the data network that is not the image's owner cannot
// write a copy, whatever generation it claims, and cannot fence the real
// owner off: the owner's writes go on, the copies stay in sync.
func TestPeerRefusesForgedWrites(t *testing.T) {
	c := newCluster(t, "n1", "n2")
	n1, n2 := c.nodes[0], c.nodes[1]
	n1.mustCLI("image", "create", "forge", "--size", "8M", "--block-size", "1M", "--locations", "n1,n2")
	qemuIO(t, n1.url("forge"), "write -P 0x3c 0 2M", "flush")
	waitOwner(t, n1, "forge", "n1")
	ref := imageRef(t, n1, "forge")
	pc := peer.NewClient(n2.peer, peer.ClientConfig{Timeout: 5 * time.Second})
	defer pc.Close()
	forgedWritesRefused(t, pc, ref, bytes.Repeat([]byte{0x3c}, 1<<20), false)
	if !strings.Contains(n2.logs.String(), "no authority over the copy") {
		t.Error("the refusals are not logged with the reason")
	}
	// The owner was not fenced: it writes on, through both copies.
	qemuIO(t, n1.url("forge"), "write -P 0x4d 1M 2M", "flush")
	if l := locations(t, n1, "forge"); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies after the forged writes and an owner's write: %v", l)
	}
	if r := imageRef(t, n1, "forge"); r.Gen != ref.Gen {
		t.Fatalf("generation moved from %d to %d", ref.Gen, r.Gen)
	}
	qemuIO(t, n2.url("forge"), "read -P 0x3c 0 1M", "read -P 0x4d 1M 2M")
	if out := n1.mustCLI("image", "verify", "forge"); !strings.Contains(out, "0 differ") {
		t.Fatalf("verify: %s", out)
	}
}

// With mutual TLS the certificate names the caller: a certificate of the
// cluster CA issued to a node that is not the owner cannot write a copy
// even with the record's generation, and one issued to a name outside the
// membership cannot forward I/O.
func TestPeerWritesOnlyFromTheOwnersCertificate(t *testing.T) {
	nodes, pki, _ := securedCluster(t, []string{"n1", "n2"}, nil)
	n1, n2 := nodes[0], nodes[1]
	n1.mustCLI("image", "create", "owned", "--size", "8M", "--block-size", "1M", "--locations", "n1,n2")
	secret := filepath.Join(t.TempDir(), "chap")
	os.WriteFile(secret, []byte("chap-secret-0123"), 0o600)
	const ini = "iqn.2026-11.test:hypervisor1"
	n1.mustCLI("image", "export", "owned", "--initiator", ini, "--chap-user", "hv1", "--chap-secret-file", secret)
	qemu := func(n *node, cmds ...string) {
		t.Helper()
		qemuIOCHAP(t, n.portal, n1.prefix+":owned", ini, "hv1", "chap-secret-0123", cmds...)
	}
	qemu(n1, "write -P 0x5b 0 2M", "flush")
	waitOwner(t, n1, "owned", "n1")
	ref := imageRef(t, n1, "owned")
	if out, err := exec.Command(ukaiBin, "tls", "issue", "intruder", "--dir", pki, "--host", "127.0.0.1").CombinedOutput(); err != nil {
		t.Fatalf("tls issue: %v %s", err, out)
	}
	// client is a data transport client of addr with name's certificate.
	client := func(name, addr string) *peer.Client {
		conf, err := tlsutil.Files{CA: filepath.Join(pki, "ca.pem"), Cert: filepath.Join(pki, name+".pem"), Key: filepath.Join(pki, name+"-key.pem")}.ClientConfig("")
		if err != nil {
			t.Fatal(err)
		}
		c := peer.NewClient(addr, peer.ClientConfig{TLS: conf, Timeout: 5 * time.Second})
		t.Cleanup(func() { c.Close() })
		return c
	}
	// A member that is not the owner, and a stranger with a CA
	// certificate: refused with any generation, the record's included.
	want := bytes.Repeat([]byte{0x5b}, 1<<20)
	forgedWritesRefused(t, client("n2", n2.peer), ref, want, true)
	forgedWritesRefused(t, client("intruder", n2.peer), ref, want, true)
	// Forwarded I/O from outside the membership is refused by the owner.
	fc := client("intruder", n1.peer)
	if err := fc.ForwardWrite(context.Background(), ref, make([]byte, 4096), 0, true); !errors.Is(err, peer.ErrForbidden) {
		t.Errorf("forwarded write from a certificate outside the membership: %v, want refused", err)
	}
	if err := fc.ForwardRead(context.Background(), ref, make([]byte, 4096), 0); !errors.Is(err, peer.ErrForbidden) {
		t.Errorf("forwarded read from a certificate outside the membership: %v, want refused", err)
	}
	// The owner goes on, both copies in sync.
	qemu(n1, "write -P 0x6c 1M 1M", "flush")
	if l := locations(t, n1, "owned"); l["n1"] != 0 || l["n2"] != 0 {
		t.Fatalf("copies after the refused writes and an owner's write: %v", l)
	}
	qemu(n2, "read -P 0x5b 0 1M", "read -P 0x6c 1M 1M")
}
