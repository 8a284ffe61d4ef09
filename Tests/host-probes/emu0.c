// Probe: which instructions KVM's emulator completes at CPL0 on this PVM host (emulated mode).
// ./emu0 NAME   runs one instruction at CPL0 (CR4 with OSXSAVE, PKE, FSGSBASE), then out 0x80.
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#define MEMSZ (64ul<<20)
struct ins { const char*name; uint8_t b[16]; int n; };
static struct ins T[]={
 {"xgetbv",{0x31,0xc9,0x0f,0x01,0xd0},5},
 {"xsetbv",{0x31,0xc9,0x31,0xd2,0xb8,7,0,0,0,0x0f,0x01,0xd1},12},
 {"rdpkru",{0x31,0xc9,0x0f,0x01,0xee},5},
 {"wrpkru",{0x31,0xc9,0x31,0xd2,0xb8,0xc,0,0,0,0x0f,0x01,0xef},12},
 {"rdfsbase",{0xf3,0x48,0x0f,0xae,0xc0},5},
 {"wrfsbase",{0xf3,0x48,0x0f,0xae,0xd0},5},
 {"rdgsbase",{0xf3,0x48,0x0f,0xae,0xc8},5},
 {"fxsave",{0xbf,0,0x60,0,0,0x48,0x0f,0xae,0x07},9},
 {"fxrstor",{0xbf,0,0x60,0,0,0x48,0x0f,0xae,0x0f},9},
 {"xsave",{0xbf,0,0x60,0,0,0x31,0xd2,0xb8,7,0,0,0,0x48,0x0f,0xae,0x27},16},
 {"swapgs",{0x0f,0x01,0xf8},3},
 {"rdtscp",{0x0f,0x01,0xf9},3},
 {"rdpid",{0xf3,0x0f,0xc7,0xf8},4},
};
int main(int argc,char**argv){
  for(unsigned t=0;t<sizeof T/sizeof T[0];t++){ if(argc>1&&strcmp(argv[1],T[t].name))continue;
  int kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
  uint8_t*mem=mmap(NULL,MEMSZ,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=MEMSZ,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffffull; gdt[2]=0x00cf93000000ffffull; gdt[3]=0x008f8b000000ffffull;
  uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
  pml4[0]=0xa000|3; pdpt[0]=0xb000|3; for(int i=0;i<32;i++) pd[i]=(i<<21)|0x83;
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
  struct kvm_run*run=mmap(NULL,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
  ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp); ioctl(vcpu,KVM_SET_CPUID2,&cp);
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment cs={.base=0,.limit=0xfffff,.selector=8,.type=11,.present=1,.s=1,.l=1,.g=1};
  struct kvm_segment ds={.base=0,.limit=0xfffff,.selector=0x10,.type=3,.present=1,.db=1,.s=1,.g=1};
  struct kvm_segment tr={.base=0,.limit=0xfffff,.selector=0x18,.type=11,.present=1,.g=1};
  s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.tr=tr; s.gdt.base=0x500; s.gdt.limit=31;
  s.cr0=0x80000033; s.cr3=0x9000; s.cr4=0x20|0x600|(1<<18)|(1<<22)|(1<<16); s.efer=0x500;
  if(ioctl(vcpu,KVM_SET_SREGS,&s)<0) perror("sregs");
  memcpy(mem+0x2000,T[t].b,T[t].n); mem[0x2000+T[t].n]=0xe7; mem[0x2001+T[t].n]=0x80;
  struct kvm_regs g={0}; g.rip=0x2000; g.rsp=0x7000; g.rflags=2; ioctl(vcpu,KVM_SET_REGS,&g);
  ioctl(vcpu,KVM_RUN,0);
  if(run->exit_reason==KVM_EXIT_IO) printf("%-9s completed (out 0x%x)\n",T[t].name,run->io.port);
  else if(run->exit_reason==KVM_EXIT_INTERNAL_ERROR) printf("%-9s REJECTED: internal error suberror %d\n",T[t].name,run->internal.suberror);
  else if(run->exit_reason==KVM_EXIT_SHUTDOWN) printf("%-9s faulted (triple fault: #UD/#GP with no IDT)\n",T[t].name);
  else printf("%-9s exit %d\n",T[t].name,run->exit_reason);
  close(vcpu); close(vm); close(kvm); munmap(mem,MEMSZ);
  }
}
