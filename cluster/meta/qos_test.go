package meta_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/placement"
)

// TestQoSInTheRecord: limits are stored with the image, an impossible
// change is refused, and a record whose limits are malformed is reported
// with its key, never used.
func TestQoSInTheRecord(t *testing.T) {
	ctx := context.Background()
	c := newCatalog(t)
	if _, err := c.CreateImage(ctx, meta.Image{Name: "vm1", Size: 1 << 20, BlockSize: 1 << 20, Locations: []string{"n1"}}, placement.InSync); err != nil {
		t.Fatal(err)
	}
	if _, err := c.UpdateImage(ctx, "vm1", func(i *meta.Image) error {
		i.QoS = &meta.QoS{IOPSLimit: 2000, WriteBWLimit: 100 << 20, WriteBWBurst: 200 << 20}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	img, _, err := c.GetImage(ctx, "vm1")
	if err != nil || img.QoS == nil || img.QoS.IOPSLimit != 2000 || img.QoS.Limits().WriteBPS.Burst != 200<<20 {
		t.Fatalf("read back: %+v, %v", img.QoS, err)
	}
	for _, bad := range []meta.QoS{{ReadIOPSLimit: -1}, {BWBurst: 1 << 20}, {IOPSLimit: 1 << 60}} {
		_, err := c.UpdateImage(ctx, "vm1", func(i *meta.Image) error { i.QoS = &bad; return nil })
		if !errors.Is(err, meta.ErrInvalid) {
			t.Errorf("update to %+v: %v, want invalid", bad, err)
		}
	}
	e, err := c.KV().Get(ctx, "ukai/images/vm1")
	if err != nil {
		t.Fatal(err)
	}
	val := strings.Replace(string(e.Value), `"iops_limit":2000`, `"iops_limit":-5`, 1)
	if val == string(e.Value) {
		t.Fatalf("no iops_limit in the stored record: %s", e.Value)
	}
	if err := c.KV().CAS(ctx, e.Key, []byte(val), e.ModifyIndex); err != nil {
		t.Fatal(err)
	}
	var me *meta.MalformedError
	if _, _, err := c.GetImage(ctx, "vm1"); !errors.As(err, &me) || me.Key != "ukai/images/vm1" || !strings.Contains(err.Error(), "iops") {
		t.Fatalf("a record with a negative limit: %v, want malformed metadata naming the key and the limit", err)
	}
	if (*meta.QoS)(nil).Validate() != nil || !(*meta.QoS)(nil).Zero() || !(*meta.QoS)(nil).Limits().Zero() {
		t.Fatal("no QoS must be valid and limit nothing")
	}
}
