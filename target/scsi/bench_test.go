package scsi

import (
	"context"
	"testing"
)

func benchIO(b *testing.B, op byte, blocks uint16) {
	cfg := testConfig()
	cfg.Size = 256 << 20
	cfg.MaxTransferBlocks = 0
	lu, _ := readyLU(b, cfg)
	size := int(blocks) * 512
	data := make([]byte, size)
	// Pre-populate so reads hit allocated chunks.
	span := uint32(cfg.Size/512) - uint32(blocks)
	for lba := uint32(0); lba < 64<<20/512; lba += uint32(blocks) {
		run(lu, nexA, cdb10(opWrite10, lba, blocks), data)
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		cdb := cdb10(op, 0, blocks)
		cmd := &Command{Nexus: nexA, CDB: cdb, ExpectedLen: uint32(size)}
		if op == opWrite10 {
			cmd.DataOut = data
		}
		ctx := context.Background()
		lba := uint32(0)
		for pb.Next() {
			lba = (lba + uint32(blocks)*7) % span
			cdb[2], cdb[3], cdb[4], cdb[5] = byte(lba>>24), byte(lba>>16), byte(lba>>8), byte(lba)
			if r := lu.Execute(ctx, cmd); r.Status != StatusGood {
				b.Fatalf("status %#x sense %x", r.Status, r.Sense)
			}
		}
	})
}

func BenchmarkRead10_4K(b *testing.B)  { benchIO(b, opRead10, 8) }
func BenchmarkWrite10_4K(b *testing.B) { benchIO(b, opWrite10, 8) }
func BenchmarkRead10_1M(b *testing.B)  { benchIO(b, opRead10, 2048) }
func BenchmarkWrite10_1M(b *testing.B) { benchIO(b, opWrite10, 2048) }

// BenchmarkWrite10_4K_CAWPending measures ordinary writes while COMPARE
// AND WRITEs run elsewhere (the shared range lock path).
func BenchmarkWrite10_4K_CAWPending(b *testing.B) {
	lu, _ := readyLU(b, testConfig())
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		data := make([]byte, 1024)
		for {
			select {
			case <-stop:
				return
			default:
				lu.Execute(context.Background(), &Command{Nexus: nexB, CDB: cawCDB(100000, 1), DataOut: data})
			}
		}
	}()
	data := make([]byte, 4096)
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		lu.Execute(context.Background(), &Command{Nexus: nexA, CDB: cdb10(opWrite10, uint32(i%1000)*8, 8), DataOut: data})
	}
	b.StopTimer()
	close(stop)
	<-done
}
