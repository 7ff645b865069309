package meta_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

func TestNodeStates(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	if st, bad, err := c.NodeStates(ctx); err != nil || len(st) != 0 || len(bad) != 0 {
		t.Fatalf("empty: %v %v %v", st, bad, err)
	}
	if _, err := c.UpdateNodeState(ctx, "n1", func(s *meta.NodeState) error { s.Cordoned = true; return nil }); err != nil {
		t.Fatal(err)
	}
	started := time.Date(2026, 12, 7, 1, 2, 3, 0, time.UTC)
	if _, err := c.UpdateNodeState(ctx, "n2", func(s *meta.NodeState) error {
		s.Cordoned, s.Drain = true, &meta.Drain{Started: started, Now: true}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	refused := errors.New("refused")
	if _, err := c.UpdateNodeState(ctx, "n1", func(s *meta.NodeState) error { s.Cordoned = false; return refused }); !errors.Is(err, refused) {
		t.Fatalf("fn error not returned: %v", err)
	}
	st, bad, err := c.NodeStates(ctx)
	if err != nil || len(bad) != 0 || !st["n1"].Cordoned || st["n1"].Drain != nil || st["n2"].Drain == nil || !st["n2"].Drain.Started.Equal(started) || !st["n2"].Drain.Now {
		t.Fatalf("states %+v %v %v", st, bad, err)
	}
	// Uncordoned: the key goes.
	if _, err := c.UpdateNodeState(ctx, "n1", func(s *meta.NodeState) error { *s = meta.NodeState{}; return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := c.KV().Get(ctx, "ukai/policies/nodes/n1"); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("cleared state still stored: %v", err)
	}
	// Malformed: reported, and read as cordoned (no copy placed there).
	if err := c.KV().CAS(ctx, "ukai/policies/nodes/n3", []byte(`{"version":9}`), 0); err != nil {
		t.Fatal(err)
	}
	st, bad, err = c.NodeStates(ctx)
	if err != nil || len(bad) != 1 || !strings.Contains(bad[0].Error(), "unknown node state version 9") || !st["n3"].Cordoned {
		t.Fatalf("malformed: %+v %v %v", st, bad, err)
	}
	// ... and an uncordon replaces it.
	if _, err := c.UpdateNodeState(ctx, "n3", func(s *meta.NodeState) error {
		if !s.Cordoned {
			t.Error("a malformed state reached fn as not cordoned")
		}
		*s = meta.NodeState{}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if st, bad, err := c.NodeStates(ctx); err != nil || len(bad) != 0 || st["n3"].Cordoned {
		t.Fatalf("after uncordoning the malformed state: %+v %v %v", st, bad, err)
	}
}

func TestGroups(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	for _, bad := range []struct {
		name string
		rule placement.GroupRule
		want string
	}{
		{"db", placement.GroupRule{Kind: "near", Label: "rack"}, "want affinity or anti-affinity"},
		{"db", placement.GroupRule{Kind: placement.Affinity}, "no label key"},
		{"a/b", placement.GroupRule{Kind: placement.Affinity, Label: "rack"}, "want 1-64 letters"},
	} {
		if err := c.SetGroupRule(ctx, bad.name, &bad.rule); !errors.Is(err, meta.ErrInvalid) || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s %+v: %v", bad.name, bad.rule, err)
		}
	}
	if err := c.SetGroupRule(ctx, "db", &placement.GroupRule{Kind: placement.AntiAffinity, Label: "host"}); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"vm1", "vm2", "web"} {
		if _, err := c.CreateImage(ctx, meta.Image{Name: n, Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1", "n2"}}, placement.InSync); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []string{"vm2", "vm1"} {
		if _, err := c.UpdateImagePolicy(ctx, n, func(p *placement.ImagePolicy) error { p.Group = "db"; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.UpdateImagePolicy(ctx, "web", func(p *placement.ImagePolicy) error { p.Replicas = 3; return nil }); err != nil {
		t.Fatal(err)
	}
	rules, bad, err := c.GroupRules(ctx)
	if err != nil || len(bad) != 0 || rules["db"] != (placement.GroupRule{Kind: placement.AntiAffinity, Label: "host"}) {
		t.Fatalf("rules %v %v %v", rules, bad, err)
	}
	gi, err := c.GroupImages(ctx, "db")
	if err != nil || len(gi["db"]) != 2 || gi["db"][0].Name != "vm1" || gi["db"][1].Copies != 2 {
		t.Fatalf("group images %+v %v", gi, err)
	}
	if err := c.SetGroupRule(ctx, "db", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.SetGroupRule(ctx, "db", nil); !errors.Is(err, meta.ErrGroupNotFound) {
		t.Fatalf("second delete: %v", err)
	}
}
