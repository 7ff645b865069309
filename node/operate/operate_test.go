package operate

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/api"
	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/node/executor"
	"github.com/ukai-storage/ukai/placement"
)

// host is the membership the executor builds plans with; it executes
// nothing.
type host struct{ nodes []placement.NodeInfo }

func (h *host) Images() []executor.Image { return nil }
func (h *host) Alive(n string) bool {
	for _, x := range h.nodes {
		if x.Name == n {
			return x.Alive
		}
	}
	return false
}
func (h *host) Nodes() []placement.NodeInfo                          { return h.nodes }
func (h *host) AddLocation(context.Context, string, string) error    { return nil }
func (h *host) RemoveLocation(context.Context, string, string) error { return nil }
func (h *host) Sync(context.Context, executor.Image, int64, int64, string, executor.Pacer) error {
	return nil
}

func newOperator(t *testing.T, nodes ...string) (*Operator, *meta.Catalog, *host) {
	cat := kvtest.BoltCatalog(t)
	h := &host{}
	for _, n := range nodes {
		h.nodes = append(h.nodes, placement.NodeInfo{Name: n, Alive: true, Free: 1 << 40})
	}
	known := func(n string) bool { return h.Alive(n) }
	ex := executor.New(executor.Config{Self: nodes[0], Catalog: cat, Host: h})
	return New(Config{Catalog: cat, Plans: ex, Known: known,
		Attach: func(context.Context, string, string) error { return errors.New("no attach here") },
		Detach: func(context.Context, string) error { return errors.New("no detach here") }}), cat, h
}

func TestCordonRules(t *testing.T) {
	ctx := context.Background()
	o, cat, _ := newOperator(t, "n1", "n2")
	refused := func(err error, want string) {
		t.Helper()
		if !errors.Is(err, meta.ErrRefused) || !strings.Contains(err.Error(), want) {
			t.Fatalf("got %v, want a refusal saying %q", err, want)
		}
	}
	if _, err := o.Cordon(ctx, "nosuch", false); !errors.Is(err, meta.ErrNodeNotFound) || !strings.Contains(err.Error(), "no node nosuch") {
		t.Fatalf("cordon of an unknown node: %v", err)
	}
	if op, err := o.Cordon(ctx, "n1", false); err != nil || !op.Cordoned {
		t.Fatalf("cordon: %+v %v", op, err)
	}
	_, err := o.Cordon(ctx, "n1", false)
	refused(err, "n1 is already cordoned")
	if _, err := o.Cordon(ctx, "n1", true); err != nil {
		t.Fatalf("cordon --move-owners of a cordoned node moves its owners: %v", err)
	}
	if _, err := o.Uncordon(ctx, "n1"); err != nil {
		t.Fatal(err)
	}
	_, err = o.Uncordon(ctx, "n1")
	refused(err, "n1 is not cordoned")
	// A state this ukai cannot read (a newer version): only an uncordon
	// replaces it.
	if err := cat.KV().CAS(ctx, "ukai/policies/nodes/n2", []byte(`{"version":2,"future":true}`), 0); err != nil {
		t.Fatal(err)
	}
	_, err = o.Cordon(ctx, "n2", true)
	refused(err, "cannot be read by this ukai")
	_, err = o.Drain(ctx, "n2", api.DrainRequest{})
	refused(err, "cannot be read by this ukai")
	if _, err := o.Uncordon(ctx, "n2"); err != nil {
		t.Fatalf("uncordon of an unreadable state: %v", err)
	}
	if st, bad, err := cat.NodeStates(ctx); err != nil || len(bad) != 0 || len(st) != 0 {
		t.Fatalf("after the uncordons: %+v %v %v", st, bad, err)
	}
}

// TestDrainRefusedWhenItCannotFinish: a drain is planned first; one the
// planner would refuse for an image changes nothing and names it, with
// the planner's reason; with a node to go to, it starts, and its progress
// counts the bytes the new copy lacks.
func TestDrainRefusedWhenItCannotFinish(t *testing.T) {
	ctx := context.Background()
	o, cat, h := newOperator(t, "n1", "n2", "n3")
	kvtest.OwnedImage(t, cat, "three", 4<<20, 1<<20, "", "n1", "n2", "n3")
	kvtest.OwnedImage(t, cat, "one", 4<<20, 1<<20, "", "n2")
	_, err := o.Drain(ctx, "n1", api.DrainRequest{})
	if !errors.Is(err, meta.ErrRefused) || !strings.Contains(err.Error(), "three: replicas 3 wanted") ||
		!strings.Contains(err.Error(), "nothing changed") || strings.Contains(err.Error(), "one:") {
		t.Fatalf("drain with nowhere to go: %v", err)
	}
	if st, _, _ := cat.NodeStates(ctx); len(st) != 0 {
		t.Fatalf("a refused drain changed the node states: %+v", st)
	}
	h.nodes = append(h.nodes, placement.NodeInfo{Name: "n4", Alive: true, Free: 1 << 40})
	op, err := o.Drain(ctx, "n1", api.DrainRequest{Now: true})
	if err != nil {
		t.Fatal(err)
	}
	if !op.Draining || op.Total != 1 || op.Done != 0 || op.BytesLeft != 4<<20 || len(op.Images) != 1 || op.Images[0].Name != "three" {
		t.Fatalf("drain started: %+v", op)
	}
	_, err = o.Drain(ctx, "n1", api.DrainRequest{})
	if !errors.Is(err, meta.ErrRefused) || !strings.Contains(err.Error(), "already draining") {
		t.Fatalf("a second drain: %v", err)
	}
}
