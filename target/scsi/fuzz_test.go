package scsi

import (
	"context"
	"testing"
)

func FuzzExecute(f *testing.F) {
	seeds := [][]byte{
		cdbTUR(),
		{opInquiry, 1, 0xb0, 0, 255, 0},
		cdb10(opRead10, 0, 1),
		cdb10(opWrite10, 1, 2),
		cdb16(opWriteSame16, 0, 4),
		cawCDB(0, 1),
		unmapCDB(24),
		proutCDB(proutRegister, 0),
		{opModeSense10, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0},
		{opModeSelect6, 0x10, 0, 0, 24, 0},
		{opMaintenanceIn, saReportSupported, 0x82, opPROut, 0, 1, 0, 0, 1, 0, 0, 0},
		{opServiceActionIn16, saGetLBAStatus, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0},
	}
	for i, s := range seeds {
		f.Add(s, unmapList([2]uint64{0, 1}), byte(i))
	}
	f.Fuzz(func(t *testing.T, cdb, data []byte, sel byte) {
		cfg := Config{
			Size:               1 << 20,
			ThinProvisioning:   sel&1 != 0,
			WriteCache:         sel&2 != 0,
			ReadOnly:           sel&4 != 0,
			MaxTransferBlocks:  uint32(sel&8) * 64,
			MaxWriteSameBlocks: 0,
		}
		if sel&16 != 0 {
			cfg.LogicalBlockSize = 4096
		}
		lu, err := NewLU(cfg, newMemBackend(cfg.Size), nil)
		if err != nil {
			t.Fatal(err)
		}
		nexus := NexusID("a")
		if sel&32 != 0 {
			lu.AddNexus(nexus)
		}
		var lun uint64
		if sel&64 != 0 {
			lun = 1
		}
		for i := 0; i < 2; i++ { // the second run is past the unit attention
			cmd := &Command{Nexus: nexus, LUN: lun, CDB: cdb, DataOut: data, ExpectedLen: uint32(len(data)) + 4096}
			r := lu.Execute(context.Background(), cmd)
			checkWellFormed(t, r)
		}
	})
}

func checkWellFormed(t *testing.T, r Result) {
	t.Helper()
	if r.Aborted {
		return
	}
	switch r.Status {
	case StatusGood, StatusCheckCondition, StatusConditionMet, StatusReservationConflict:
	default:
		t.Fatalf("status %#x", r.Status)
	}
	if (r.Status == StatusCheckCondition) != (r.Sense != nil) {
		t.Fatalf("status %#x with sense %x", r.Status, r.Sense)
	}
	if r.Sense != nil {
		if len(r.Sense) < 18 || r.Sense[0]&0x7f != 0x70 || int(r.Sense[7])+8 != len(r.Sense) {
			t.Fatalf("malformed sense %x", r.Sense)
		}
		if r.DataIn != nil {
			t.Fatal("data with CHECK CONDITION")
		}
	}
	if uint64(len(r.DataIn)) > uint64(r.TransferLen) {
		t.Fatalf("DataIn %d bytes > TransferLen %d", len(r.DataIn), r.TransferLen)
	}
}
