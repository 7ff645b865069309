//go:build vm

package vm

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/cluster/consulkv/consultest"
)

func TestZZDebug(t *testing.T) {
	agent := consultest.Start(t, consultest.Persistent(t.TempDir()))
	n1 := startNode(t, "n1", "a", agent.Addr, nil)
	n1.mustCLI("image", "create", "smoke", "--size", "64M", "--block-size", "1M")
	h := startHost(t, "H", []string{n1.portal})
	for _, s := range strings.Split(os.Getenv("DBG"), ";;") {
		out, rc := h.run(t, 60*time.Second, s)
		t.Logf("$ %s\nrc=%d\n%s", s, rc, out)
	}
}
