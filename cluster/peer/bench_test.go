package peer

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ukai-storage/ukai/target/lun"
)

// BenchmarkIO compares the same operations through the peer transport
// (RemoteCopy over a real 127.0.0.1 connection) and on the local FileCopy
// directly. The ratio of the two MB/s columns is the transport's cost.
func BenchmarkIO(b *testing.B) {
	const imgSize = 256 << 20
	st := newStore()
	ref, fc := st.addFile(b, imgSize, 4<<20)
	_, addr := startServer(b, st, ServerConfig{})
	c := newClient(b, addr, ClientConfig{})
	copies := []struct {
		name string
		c    lun.Copy
	}{{"local", fc}, {"peer", RemoteCopy(c, ref)}}
	// Fill the image so reads hit data, not holes.
	fill := randBytes(4 << 20)
	for off := int64(0); off < imgSize; off += int64(len(fill)) {
		if err := fc.WriteAt(context.Background(), fill, off, false); err != nil {
			b.Fatal(err)
		}
	}
	for _, tc := range []struct {
		size, qd int
	}{{4 << 10, 1}, {4 << 10, 16}, {4 << 20, 1}, {4 << 20, 4}} {
		for _, op := range []string{"write", "read"} {
			for _, cp := range copies {
				name := fmt.Sprintf("%s/%dK/qd%d/%s", op, tc.size>>10, tc.qd, cp.name)
				b.Run(name, func(b *testing.B) { benchIO(b, cp.c, op == "write", tc.size, tc.qd, imgSize) })
			}
		}
	}
}

func benchIO(b *testing.B, c lun.Copy, write bool, size, qd int, imgSize int64) {
	ctx := context.Background()
	b.SetBytes(int64(size))
	slots := imgSize / int64(size)
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	b.ResetTimer()
	for g := 0; g < qd; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := randBytes(size)
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				off := (i * 7919 % slots) * int64(size)
				var err error
				if write {
					err = c.WriteAt(ctx, buf, off, false)
				} else {
					err = c.ReadAt(ctx, buf, off)
				}
				if err != nil {
					failed.Store(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRemoteWrite4KCPU is a 4 KiB write to a remote copy as a
// volume makes it (a context with the copy timeout per request, one
// client, queue depth 16; server in process), reported as CPU seconds
// (client and server, getrusage) per GB written: the per-request cost
// the control plane redesign of issue 17 lowered (one deadline per
// request instead of two timers).
func BenchmarkRemoteWrite4KCPU(b *testing.B) {
	const imgSize = 64 << 20
	st := newStore()
	ref, _ := st.addFile(b, imgSize, 4<<20)
	_, addr := startServer(b, st, ServerConfig{})
	c := newClient(b, addr, ClientConfig{})
	rc := RemoteCopy(c, ref)
	const size, qd = 4 << 10, 16
	b.SetBytes(size)
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	cpu0 := cpuTime(b)
	b.ResetTimer()
	for range qd {
		wg.Go(func() {
			buf := randBytes(size)
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				err := rc.WriteAt(ctx, buf, (i*7919%(imgSize/size))*size, false)
				cancel()
				if err != nil {
					failed.Store(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	gb := float64(b.N) * size / 1e9
	b.ReportMetric((cpuTime(b)-cpu0).Seconds()/gb, "cpu-s/GB")
}

// cpuTime is the process's user and system CPU time.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
