package reconcile

import (
	"context"
	"errors"
	"slices"
	"sort"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
	"github.com/ukai-storage/ukai/placement"
)

func TestDecide(t *testing.T) {
	img := meta.Image{ID: "a", Name: "vm", Locations: []string{"n2"}}
	owned := meta.Image{ID: "a", Name: "vm", Locations: []string{"n2"}, Owner: "n1"}
	attached := meta.Image{ID: "a", Name: "vm", Locations: []string{"n2"}, Attached: "n1"}
	copyHere := meta.Image{ID: "a", Name: "vm", Locations: []string{"n2", "n1"}}
	tests := []struct {
		name     string
		img      meta.Image
		servedID string
		want     Action
	}{
		{"served: apply", img, "a", Action{Apply: true}},
		{"not served, does not concern this node", img, "", Action{}},
		{"not served, a copy here", copyHere, "", Action{Export: true}},
		{"not served, owned here", owned, "", Action{Export: true}},
		{"not served, attached here", attached, "", Action{Export: true}},
		{"another image under the name, concerns", copyHere, "b", Action{Withdraw: true, Export: true}},
		{"another image under the name, does not concern", img, "b", Action{Withdraw: true}},
	}
	for _, tc := range tests {
		if got := Decide(tc.img, tc.servedID, "n1"); got != tc.want {
			t.Errorf("%s: Decide = %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

// host is a served set in memory that records what it was asked.
type host struct {
	served map[string]string // name -> id
	calls  []string
	fail   map[string]bool // Export/Apply of these names fail
}

func (h *host) ServedID(name string) string { return h.served[name] }
func (h *host) ServedNames() []string {
	var out []string
	for n := range h.served {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
func (h *host) Export(_ context.Context, img meta.Image) error {
	h.calls = append(h.calls, "export "+img.Name)
	if h.fail[img.Name] {
		return errors.New("injected")
	}
	h.served[img.Name] = img.ID
	return nil
}
func (h *host) Apply(_ context.Context, img meta.Image) error {
	h.calls = append(h.calls, "apply "+img.Name)
	if h.fail[img.Name] {
		return errors.New("injected")
	}
	return nil
}
func (h *host) Withdraw(_ context.Context, name string) error {
	h.calls = append(h.calls, "withdraw "+name)
	delete(h.served, name)
	return nil
}
func (h *host) take() []string {
	c := h.calls
	h.calls = nil
	sort.Strings(c)
	return c
}

func setup(t *testing.T) (*meta.Catalog, *host, *Reconciler) {
	t.Helper()
	cat := kvtest.BoltCatalog(t)
	h := &host{served: map[string]string{}, fail: map[string]bool{}}
	return cat, h, New(Config{Catalog: cat, Self: "n1", Host: h})
}

func create(t *testing.T, cat *meta.Catalog, name string, locs ...string) meta.Image {
	t.Helper()
	img, err := cat.CreateImage(context.Background(), meta.Image{Name: name, Size: 1 << 20, BlockSize: 1 << 20, Locations: locs}, placement.InSync)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// The full pass costs what changed: an unchanged record is not applied
// again; a changed one is; a failed one is retried; a gone one is
// withdrawn and forgotten.
func TestFullAppliesWhatChanged(t *testing.T) {
	ctx := context.Background()
	cat, h, r := setup(t)
	create(t, cat, "a", "n1")
	create(t, cat, "b", "n2") // concerns n2 only
	create(t, cat, "c", "n1", "n2")
	h.fail["c"] = true
	full := func(want ...string) {
		t.Helper()
		_ = r.Full(ctx)
		if got := h.take(); !slices.Equal(got, want) {
			t.Fatalf("pass did %q, want %q", got, want)
		}
	}
	full("export a", "export c")
	if k := r.Known(); len(k) != 3 || !k["c"].Retry || k["a"].Retry {
		t.Fatalf("known after the first pass: %+v", k)
	}
	full("export c") // c failed: retried; a, b unchanged
	delete(h.fail, "c")
	full("export c")
	full() // nothing changed
	if _, err := cat.UpdateImage(ctx, "a", func(i *meta.Image) error { i.Attached = "n2"; return nil }); err != nil {
		t.Fatal(err)
	}
	full("apply a")
	if _, err := cat.UpdateImage(ctx, "b", func(i *meta.Image) error { i.Owner = "n1"; return nil }); err != nil {
		t.Fatal(err)
	}
	full("export b")
	if err := cat.DeleteImage(ctx, mustGet(t, cat, "c"), 0); err != nil {
		t.Fatal(err)
	}
	full("withdraw c")
	if _, ok := r.Known()["c"]; ok {
		t.Fatal("a deleted record is still known")
	}
}

func mustGet(t *testing.T, cat *meta.Catalog, name string) meta.Image {
	t.Helper()
	img, _, err := cat.GetImage(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// An image deleted and created again under the same name: the old one is
// withdrawn before the new one is exported.
func TestFullReplacesImageOfSameName(t *testing.T) {
	ctx := context.Background()
	cat, h, r := setup(t)
	old := create(t, cat, "a", "n1")
	_ = r.Full(ctx)
	h.take()
	if err := cat.DeleteImage(ctx, old, 0); err != nil {
		t.Fatal(err)
	}
	fresh := create(t, cat, "a", "n1")
	_ = r.Full(ctx)
	if got := h.calls; !slices.Equal(got, []string{"withdraw a", "export a"}) {
		t.Fatalf("pass did %q, want the withdrawal first", got)
	}
	if h.served["a"] != fresh.ID {
		t.Fatalf("served id %s, want the new image's %s", h.served["a"], fresh.ID)
	}
}

// Refresh applies one record; a record older than the one applied
// changes nothing; a gone one is withdrawn.
func TestRefresh(t *testing.T) {
	ctx := context.Background()
	cat, h, r := setup(t)
	create(t, cat, "a", "n1")
	create(t, cat, "b", "n2")
	if concerns, err := r.Refresh(ctx, "a"); !concerns || err != nil {
		t.Fatalf("refresh a: %v %v", concerns, err)
	}
	if concerns, err := r.Refresh(ctx, "b"); concerns || err != nil {
		t.Fatalf("refresh b (not ours): %v %v", concerns, err)
	}
	if got := h.take(); !slices.Equal(got, []string{"export a"}) {
		t.Fatalf("did %q", got)
	}
	// What this node applied is newer than the stored record (it read a
	// record it changed itself): nothing happens.
	k := r.Known()["a"]
	r.remember("a", &Known{Rev: k.Rev + 100})
	if _, err := r.Refresh(ctx, "a"); err != nil || len(h.take()) != 0 {
		t.Fatal("an older record was applied")
	}
	if err := cat.DeleteImage(ctx, mustGet(t, cat, "a"), 0); err != nil {
		t.Fatal(err)
	}
	if concerns, err := r.Refresh(ctx, "a"); concerns || err != nil {
		t.Fatalf("refresh of a deleted image: %v %v", concerns, err)
	}
	if got := h.take(); !slices.Equal(got, []string{"withdraw a"}) {
		t.Fatalf("did %q, want the withdrawal", got)
	}
}

// An image first needed here is exported once and remembered.
func TestExportLazily(t *testing.T) {
	ctx := context.Background()
	cat, h, r := setup(t)
	create(t, cat, "b", "n2")
	if err := r.ExportLazily(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if err := r.ExportLazily(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if got := h.take(); !slices.Equal(got, []string{"export b"}) {
		t.Fatalf("did %q, want one export", got)
	}
	if _, ok := r.Known()["b"]; !ok {
		t.Fatal("a lazily exported image is not known")
	}
	if err := r.ExportLazily(ctx, "nope"); !errors.Is(err, meta.ErrImageNotFound) {
		t.Fatalf("lazy export of a missing image: %v", err)
	}
}
