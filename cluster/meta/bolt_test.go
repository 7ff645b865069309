package meta_test

import (
	"path/filepath"
	"testing"

	"github.com/ukai-storage/ukai/cluster/meta"
	"github.com/ukai-storage/ukai/cluster/meta/kvtest"
)

func TestBoltContract(t *testing.T) {
	kvtest.Run(t, func(t *testing.T) meta.KV {
		kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { kv.Close() })
		return kv
	})
}

func TestBoltLockedByOtherOpen(t *testing.T) {
	p := filepath.Join(t.TempDir(), "meta.db")
	kv, err := meta.OpenBolt(p)
	if err != nil {
		t.Fatal(err)
	}
	defer kv.Close()
	if _, err := meta.OpenBolt(p); err == nil {
		t.Fatal("a second open of the same store succeeded")
	}
}

func TestBoltCatalogMalformedValues(t *testing.T) {
	kvtest.RunCatalog(t, func(t *testing.T) meta.KV {
		kv, err := meta.OpenBolt(filepath.Join(t.TempDir(), "meta.db"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { kv.Close() })
		return kv
	})
}
